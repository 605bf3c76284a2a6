//! The watch of a held lock: what changed under it (`PathChange`), the inotify set-up on its
//! directory, the symlinks and every directory the path goes through (`way_to`), and the
//! re-verification that it still excludes other copies.
//! Must not: report a loss or re-create the file itself (see `recover.rs` and `watcher.rs`).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::loss::LossReason;

use super::held::Shared;
use super::ofd::is_held;
use super::walk::MAX_SYMLINKS;

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

/// What inotify said of our file's name in our directory since the path was last seen leading
/// to our file: the watch's memory, which decides whether a lock file found gone may be
/// re-created.
///
/// Re-creating is right only for a removal that was *seen* to happen (`IN_DELETE` or
/// `IN_MOVED_FROM` at our name) and that no file made by someone else followed (`IN_CREATE`,
/// `IN_MOVED_TO` beyond our own re-creations). A removal found without having been seen — it
/// happened before the watches were in place (the holder was stopped, or slow, just after
/// acquiring), or there is no inotify at all — cannot be told from one behind which another
/// copy made the file, ran and left: that is a loss, never a silent re-creation.
///
/// The symlinks on the way are remembered the same way: a link flipped to another target and
/// back (two links made at its name, by renames over it or after removals) while the holder was
/// stopped led other copies elsewhere meanwhile, though the path leads to our file again. One
/// link made at its name is harmless only if the way the path goes now enters no directory and
/// goes through no link that the way it went when the path was last seen leading to our file
/// did not, and ends in the same directory (see [`Way::within`]): then the link led there, or
/// nowhere, at every moment (a deploy that flipped it to the release it named, or re-made it,
/// spelled as before or not). Two links made anew, each once, are not: while one was new and
/// the other not, the path may have gone a third way (`p -> q/x`, `q -> d` made
/// `p -> q`, `q -> d/x`: the same way before and after, but `d` in between).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct NameHistory {
    /// Files made at the name, by anyone (our own re-creations included), counted as
    /// [`WatchHandle::recreated`] counts ours.
    made: u64,
    /// Our name removed or moved away, seen since the path last led to our file.
    removed: u64,
    /// The kernel's queue overflowed (`IN_Q_OVERFLOW`): events were lost, and with them
    /// whatever they said (see [`NameHistory::changed_behind_us`]).
    events_lost: bool,
    /// Our re-creations at the last settle: one since, with events lost, may hide another
    /// copy's file made before ours.
    base: u64,
    /// A watched directory (ours, or one the path goes through) was moved or removed: the path
    /// left our file, even if it leads there again now.
    path_left: bool,
    /// The symlinks on the way, each with the links made at its name (a new one renamed over
    /// it, `ln -sfn`, or made after a removal) since the path last led to our file: every link
    /// the watches were added for so far (see [`NameHistory::note_links`]).
    links: Vec<LinkSeen>,
    /// The way the path went when it last led to our file (the acquisition's walk, at first).
    settled_way: Arc<Way>,
    /// Whether others may rename on the way (see [`Way::others_may_rename`]), as found by the
    /// acquisition's walk or by any way looked at since (see
    /// [`NameHistory::note_others_may_rename`]): never cleared while the lock is held.
    others_may_rename: bool,
    /// The path was seen leading to our file with our directory watched: a removal read since
    /// then is one of our file. False for a watch of our directory added only later
    /// ([`NameHistory::watched_late`]) until the path is seen so again.
    confirmed: bool,
}

/// A symlink on the way, for [`NameHistory`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkSeen {
    /// The watch descriptor of the directory that holds it.
    dir_watch: i32,
    name: OsString,
    /// Links made at its name since the path last led to our file.
    made: u64,
    /// Links removed from its name (or moved away) since then (see
    /// [`NameHistory::waits_for_the_path`]).
    removed: u64,
}

impl NameHistory {
    /// The history of a watch that starts with the path leading to our file, `recreated`
    /// times re-created so far, by `way` (see [`WatchHandle::acquired_way`]).
    pub(super) fn new(recreated: u64, way: Arc<Way>) -> Self {
        NameHistory {
            made: recreated,
            base: recreated,
            others_may_rename: way.others_may_rename,
            confirmed: true,
            settled_way: way,
            ..NameHistory::default()
        }
    }

    /// Remembers the symlinks on the way as the watches were (re-)added (see
    /// [`Watches::links`]), their events to be read from now on.
    pub(super) fn note_links(&mut self, links: Vec<(i32, OsString)>) {
        for (dir_watch, name) in links {
            if !self
                .links
                .iter()
                .any(|l| l.dir_watch == dir_watch && l.name == name)
            {
                self.links.push(LinkSeen {
                    dir_watch,
                    name,
                    made: 0,
                    removed: 0,
                });
            }
        }
    }

    /// Remembers that others may rename on a way the path went (`others_may_rename`, from
    /// [`Way::others_may_rename`] or [`Watches::others_may_rename`]): a directory made writable
    /// by its group after the acquisition (`chmod g+w`) counts for lost events from then on,
    /// as one that was so from the start. No event says when a mode changes (`IN_ATTRIB` on a
    /// directory watched for its entries fires for every `touch` of every file in it), so the
    /// modes are looked at on each re-watch, and when events were lost (see
    /// [`NameHistory::events_lost`]).
    pub(super) fn note_others_may_rename(&mut self, others_may_rename: bool) {
        self.others_may_rename |= others_may_rename;
    }

    /// Were events lost (an overflowed queue) since the path last led to our file? Then the
    /// way's modes are looked at again before judging (see
    /// [`NameHistory::note_others_may_rename`]).
    pub(super) fn events_lost(&self) -> bool {
        self.events_lost
    }

    /// Reads every pending event of `fd` (a non-blocking inotify instance) about `name` in the
    /// directory watched as `dir_watch`, and about the symlinks on the way. Whether any of
    /// them counted.
    pub(super) fn read(&mut self, fd: &OwnedFd, dir_watch: i32, name: &std::ffi::OsStr) -> bool {
        let mut counted = false;
        use std::os::unix::ffi::OsStrExt;
        const IN_MOVED_FROM: u32 = 0x40;
        const IN_DELETE_SELF: u32 = 0x400;
        const IN_MOVE_SELF: u32 = 0x800;
        const IN_MOVED_TO: u32 = 0x80;
        const IN_CREATE: u32 = 0x100;
        const IN_DELETE: u32 = 0x200;
        const IN_Q_OVERFLOW: u32 = 0x4000;
        // struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len] (NUL-padded).
        const HEADER: usize = 16;
        let mut buf = [0u8; 4096];
        while let Ok(n) = rustix::io::read(fd, &mut buf) {
            if n == 0 {
                break;
            }
            let mut at = 0;
            while at + HEADER <= n {
                let field = |i: usize| {
                    let b = &buf[at + i * 4..at + i * 4 + 4];
                    [b[0], b[1], b[2], b[3]]
                };
                let wd = i32::from_ne_bytes(field(0));
                let mask = u32::from_ne_bytes(field(1));
                let len = u32::from_ne_bytes(field(3)) as usize;
                let end = (at + HEADER).saturating_add(len).min(n);
                let raw = &buf[at + HEADER..end];
                let event_name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                if mask & IN_Q_OVERFLOW != 0 {
                    self.events_lost = true;
                    counted = true;
                } else if mask & (IN_DELETE_SELF | IN_MOVE_SELF) != 0 {
                    self.path_left = true;
                    counted = true;
                } else {
                    if wd == dir_watch && event_name == name.as_bytes() {
                        if mask & (IN_CREATE | IN_MOVED_TO) != 0 {
                            self.made += 1;
                            counted = true;
                        }
                        if mask & (IN_DELETE | IN_MOVED_FROM) != 0 {
                            self.removed += 1;
                            counted = true;
                        }
                    }
                    // A link leaving its name leads nowhere: only a new one can lead elsewhere.
                    // Its removal is counted still, to tell a path leading nowhere for a
                    // moment (`rm current && ln -s v1 current`) from one gone unseen.
                    if let Some(link) = self
                        .links
                        .iter_mut()
                        .find(|l| l.dir_watch == wd && l.name.as_bytes() == event_name)
                    {
                        if mask & (IN_CREATE | IN_MOVED_TO) != 0 {
                            link.made += 1;
                            counted = true;
                        }
                        if mask & (IN_DELETE | IN_MOVED_FROM) != 0 {
                            link.removed += 1;
                            counted = true;
                        }
                    }
                }
                at = end;
            }
        }
        counted
    }

    /// The path leads to our file (`recreated` times re-created so far): what the events said
    /// is settled (our own files, or changes that went away); count from here.
    /// `way_now`: the way the path goes now, when it was looked at (see
    /// [`NameHistory::link_made`]).
    pub(super) fn settle(&mut self, recreated: u64, way_now: Option<Arc<Way>>) {
        let mut links = std::mem::take(&mut self.links);
        for link in &mut links {
            (link.made, link.removed) = (0, 0);
        }
        let way = way_now.unwrap_or_else(|| Arc::clone(&self.settled_way));
        *self = NameHistory {
            links,
            others_may_rename: self.others_may_rename || way.others_may_rename,
            ..NameHistory::new(recreated, way)
        };
    }

    /// Our directory's watch was added only now (its first attempt failed): what happened at
    /// our name before is unknown, so no removal is taken for one of our file until the path
    /// is seen leading to it again (a settle).
    pub(super) fn watched_late(&mut self) {
        self.confirmed = false;
    }

    /// Was a link made at the name of a symlink on the way since the path last led to our
    /// file? Then the way the path goes now must be looked at: see [`NameHistory::way_left`].
    pub(super) fn link_made(&self) -> bool {
        self.links.iter().any(|l| l.made > 0)
    }

    /// Does `way_now` (the way the path goes now, looked at since a link was made on it) leave
    /// the way it went when it last led to our file (see [`Way::within`])? Then the path led
    /// elsewhere, by the new way, at least for a moment: its links there were not watched.
    pub(super) fn way_left(&self, way_now: &Way) -> bool {
        !way_now.within(&self.settled_way)
    }

    /// May the path have led elsewhere since it last led to our file, whatever it leads to
    /// now: a directory on the way moved or removed, or a symlink on the way made anew more
    /// than once (away and back), or more than one made anew (see [`NameHistory`]).
    pub(super) fn path_may_have_left(&self) -> bool {
        self.path_left
            || self.links.iter().any(|l| l.made > 1)
            || self.links.iter().filter(|l| l.made > 0).count() > 1
    }

    /// May our file, found gone from the path, be re-created (`recreated`: our re-creations so
    /// far)? Only if its removal was seen and nobody else has made a file at the name since.
    pub(super) fn only_removed(&self, recreated: u64) -> bool {
        self.confirmed
            && !self.events_lost
            && !self.path_may_have_left()
            && self.removed > 0
            && self.made <= recreated
    }

    /// The path leads nowhere (see [`lock_change`]) with our directory still naming our file:
    /// may that wait for the next event, rather than be a loss? Only if a link on the way was
    /// seen removed, and nothing else happened since the path last led to our file: no link
    /// made (whose way would decide), no directory on the way moved, no file made at our name
    /// but ours, no events lost. Then nobody could take the instance through the path: it led
    /// to our file or nowhere at every moment, and a copy that reaches our directory another
    /// way finds our file, locked. Nothing is settled meanwhile: once a link is made there
    /// again, its way decides as for any link made anew. There is no bound on the wait: a path
    /// that never leads anywhere again lets no copy in through it either (each fails to walk
    /// it), and a loss would only stop a service that still excludes every other copy.
    pub(super) fn waits_for_the_path(&self, recreated: u64) -> bool {
        self.confirmed
            && !self.events_lost
            && !self.path_may_have_left()
            && !self.link_made()
            && self.made <= recreated
            && self.links.iter().any(|l| l.removed > 0)
    }

    /// Does the path, which leads nowhere (`way_now`, looked at since), break exactly where a
    /// link was seen removed: the name missing is that link's, in the very directory watched
    /// for it (`fd` gives the same watch back for the same directory)? Else the link's removal
    /// is not why it leads nowhere: a file system mounted over that directory (which no event
    /// says), or the lock directory itself gone (a copy would make it and lock there). Only
    /// then may [`NameHistory::waits_for_the_path`] wait.
    pub(super) fn breaks_at_a_removed_link(&self, fd: &OwnedFd, way_now: &Way) -> bool {
        let Some((dir, name)) = &way_now.breaks_at else {
            return false;
        };
        let Ok(wd) = rustix::fs::inotify::add_watch(
            fd,
            dir.as_path(),
            DIR_ENTRY_EVENTS | rustix::fs::inotify::WatchFlags::MASK_ADD,
        ) else {
            return false;
        };
        self.links
            .iter()
            .any(|l| l.removed > 0 && l.dir_watch == wd && l.name == *name)
    }

    /// Did the path leave our file since it last led there, though it leads there again, in a
    /// way another copy may have used: someone else made a file at our name (our file moved
    /// away and back; or another copy's, made in the moment between our reading of a removal
    /// and our re-creation, whose event comes before ours), a directory on the way was moved
    /// or removed (and put back), or a symlink on the way was flipped away and back? Then
    /// another copy may have run: a loss, even with our file at the path. Why, if so.
    ///
    /// Events lost (an overflowed queue) count where what they may have hidden can be done
    /// by anyone but root and us: around one of our re-creations (another copy's file made
    /// first), and when others may rename entries of a directory on the way (our file, a
    /// link or a directory moved away and back: see [`Way::others_may_rename`]). Not
    /// otherwise: in a shared directory (`/run/lock/unique-instance`, sticky and writable by
    /// all) any local user can overflow the queue with files of their own, and that must not
    /// stop a service. What an overflow can then still hide is our file, a link or a directory
    /// on the way moved away and back by root or by our own user while the holder was stopped.
    pub(super) fn changed_behind_us(&self, recreated: u64) -> Option<LossReason> {
        if self.path_may_have_left() {
            Some(LossReason::LockDirectoryRemoved)
        } else if self.made > recreated
            || (self.events_lost && (recreated > self.base || self.others_may_rename))
        {
            Some(LossReason::LockFileRemoved)
        } else {
            None
        }
    }

    /// Our file was found gone with no removal read yet: an unlink queues its event just after
    /// the name goes, so it is waited for, up to [`UNSEEN_REMOVAL_GRACE`], before the removal
    /// counts as unseen (a loss). Returns at once once a removal or lost events have been read.
    /// `nowhere`: the path leads nowhere while our directory names our file (see
    /// [`lock_change`]): the removal of a link on the way is waited for instead. Whether any
    /// event read counted.
    pub(super) fn await_removal(
        &mut self,
        fd: &OwnedFd,
        dir_watch: i32,
        name: &std::ffi::OsStr,
        nowhere: bool,
    ) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let deadline = std::time::Instant::now() + UNSEEN_REMOVAL_GRACE;
        let mut counted = false;
        loop {
            counted |= self.read(fd, dir_watch, name);
            let seen = if nowhere {
                self.links.iter().any(|l| l.removed > 0)
            } else {
                self.removed > 0
            };
            if seen || self.events_lost || self.path_may_have_left() {
                return counted;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return counted;
            }
            let timeout = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos().into(),
            };
            let mut fds = [PollFd::new(fd, PollFlags::IN)];
            if !matches!(
                poll(&mut fds, Some(&timeout)),
                Ok(_) | Err(rustix::io::Errno::INTR)
            ) {
                return counted;
            }
        }
    }
}

/// How long a removal found before its inotify event was read is waited for (see
/// [`NameHistory::await_removal`]): the event follows the unlink by microseconds; this bound
/// only matters to a removal that was truly unseen, whose loss it delays.
const UNSEEN_REMOVAL_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

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

/// The directories a lock directory's path goes through as it resolves (see [`way_to`]; and
/// the acquisition's walk, which finds the same on its way: `walk_dir`).
#[derive(Debug, Default)]
pub(super) struct Way {
    /// Every directory the resolution enters, `/` aside (it can be neither renamed nor
    /// removed): the ancestors of the path as given and, through each symlink, the directories
    /// above its target, down to the lock directory itself.
    pub(super) entered: Vec<PathBuf>,
    /// Each symlink on the way: the directory that holds it, and its name there.
    pub(super) links: Vec<(PathBuf, OsString)>,
    /// Whether anyone but root and us may rename or remove entries of a directory on the way
    /// (one writable by its group or by all, without the sticky bit): then an overflowed
    /// event queue may hide what they did (see [`NameHistory::changed_behind_us`]). Known to
    /// the walk and to `way_to`, which look at each directory's mode; not part of what makes
    /// two ways the same.
    pub(super) others_may_rename: bool,
    /// Where a path that leads nowhere breaks (see [`way_to`]): the directory the resolution
    /// was in and the name missing there, when that name is not the path's last (a copy would
    /// make the last, the lock directory itself, and lock in it). Not part of what makes two
    /// ways the same.
    pub(super) breaks_at: Option<(PathBuf, OsString)>,
}

impl PartialEq for Way {
    fn eq(&self, other: &Self) -> bool {
        self.entered == other.entered && self.links == other.links
    }
}

impl Eq for Way {}

impl Way {
    /// Does this way (the path's now, after one link on `settled` was made anew) end in the
    /// same directory as `settled`, entering no directory and going through no link that
    /// `settled` did not? Those of `settled` are watched and were seen unchanged but for that
    /// link, so the path led to our directory or nowhere at every moment; one outside it was
    /// not watched, and may have been flipped away and back. Compared as sets, not in order: a
    /// link re-made with an absolute target (`ln -sfn /srv/v1 current` over `current -> v1`)
    /// enters `/srv`'s ancestors again, and goes the same way.
    pub(super) fn within(&self, settled: &Way) -> bool {
        *self == *settled
            || (self.entered.last().is_some()
                && self.entered.last() == settled.entered.last()
                && self.entered.iter().all(|d| settled.entered.contains(d))
                && self.links.iter().all(|l| settled.links.contains(l)))
    }
}

/// May anyone but its owner (root or us: the walk's rule) and root rename or remove the
/// entries of a directory with this mode? Group- or other-writable, without the sticky bit.
pub(super) fn others_may_rename_in(mode: u32) -> bool {
    mode & 0o022 != 0 && mode & 0o1000 == 0
}

/// Resolves `dir` one component at a time from `/`, as the kernel does (a symlink's target
/// takes its place, `..` goes up from where the resolution is), noting the directories it goes
/// through: renaming or removing any of them, or changing an entry of one that holds a symlink,
/// can make the path lead elsewhere; and whether others may rename on the way (from the modes
/// of `/` and of the directories entered, as they are now: see
/// [`NameHistory::note_others_may_rename`]). Best effort and unchecked, as it only adds
/// wake-ups: it stops where the path leads nowhere, and [`WatchHandle::check_path`] decides.
fn way_to(dir: &Path) -> Way {
    use std::collections::VecDeque;
    use std::os::unix::fs::PermissionsExt;
    let mut way = Way {
        others_may_rename: std::fs::metadata("/")
            .is_ok_and(|m| others_may_rename_in(m.permissions().mode())),
        ..Way::default()
    };
    let mut resolved = PathBuf::from("/");
    let mut pending: VecDeque<OsString> = names(dir).into();
    let mut links = 0;
    let mut complete = true;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        // One `lstat` per name: whether it is a link, and a directory's mode.
        let meta = std::fs::symlink_metadata(&here);
        let target = match &meta {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(&here),
            Ok(_) => Err(std::io::ErrorKind::InvalidInput.into()),
            Err(e) => Err(std::io::Error::from(e.kind())),
        };
        match target {
            Ok(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    complete = false;
                    break;
                }
                way.links.push((resolved.clone(), name.clone()));
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                // The rest of the path goes on from where the link points.
                for part in names(&target).into_iter().rev() {
                    pending.push_front(part);
                }
            }
            // Not a symlink: entered.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                if let Ok(m) = &meta
                    && m.file_type().is_dir()
                {
                    way.others_may_rename |= others_may_rename_in(m.permissions().mode());
                }
                way.entered.push(here.clone());
                resolved = here;
            }
            // Missing, or not ours to look at: the path leads nowhere from here.
            Err(e) => {
                if e.kind() == std::io::ErrorKind::NotFound && !pending.is_empty() {
                    way.breaks_at = Some((resolved.clone(), name));
                }
                complete = false;
                break;
            }
        }
    }
    // A path that ends in `..` resolves to a directory entered before: it is the last, as the
    // walk has it (`walk_dir`), so that both ways compare equal and the last is ours.
    if complete && resolved != Path::new("/") && way.entered.last() != Some(&resolved) {
        way.entered.push(resolved);
    }
    way
}

/// The names `path` is made of, `..` included, as a resolution takes them.
fn names(path: &Path) -> Vec<OsString> {
    use std::path::Component;
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

// What a loss report needs beyond `check_path`: whether our lock is still what the kernel sees.
impl WatchHandle {
    /// Re-verifies, right now, that the lock still excludes other copies: the path (from our
    /// directory, and resolved afresh) names our file, and a fresh open of it shows it locked
    /// (`F_OFD_GETLK` on a new open file description sees our lock as a conflicting one) with
    /// the same (dev, ino). Anything that cannot be checked counts as not verified.
    pub(crate) fn verify_held(&self) -> bool {
        let (dev, ino) = self.identity();
        self.verify_held_as(dev, ino)
    }

    /// [`WatchHandle::verify_held`] for the file (dev, ino).
    pub(super) fn verify_held_as(&self, dev: u64, ino: u64) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A removal is re-created only when it was seen, and nobody but us made a file at the
    /// name since; a removal found without an event (or a file someone else made) is not.
    #[test]
    fn only_a_seen_removal_with_no_other_file_may_be_recreated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = new_inotify().expect("inotify");
        let wd =
            rustix::fs::inotify::add_watch(&fd, dir.path(), DIR_ENTRY_EVENTS).expect("add_watch");
        let name = std::ffi::OsStr::new("x.lock");
        let path = dir.path().join(name);
        std::fs::write(&path, b"").expect("our file");
        let mut history = NameHistory::new(0, Arc::default());
        history.read(&fd, wd, name);
        // Found gone without a removal seen (our own creation was all): not only removed.
        assert!(!history.only_removed(0), "{history:?}");
        history.settle(0, None);
        std::fs::remove_file(&path).expect("rm");
        // Another name in the directory is not ours.
        std::fs::write(dir.path().join("other.lock"), b"").expect("another file");
        history.read(&fd, wd, name);
        assert!(history.only_removed(0), "{history:?}");
        // Our re-creation (counted by the holder as 1) is not someone else's.
        std::fs::write(&path, b"").expect("re-created");
        history.read(&fd, wd, name);
        assert!(history.only_removed(1), "{history:?}");
        // Removed again, and a file made by someone else, then gone: not only removed.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, b"").expect("another copy's");
        std::fs::remove_file(&path).expect("rm");
        history.read(&fd, wd, name);
        assert!(!history.only_removed(1), "{history:?}");
        // Moved away and in again count as removed and made.
        std::fs::write(&path, b"").expect("file");
        history.read(&fd, wd, name);
        history.settle(2, None);
        std::fs::rename(&path, dir.path().join("moved")).expect("mv");
        history.read(&fd, wd, name);
        assert!(history.only_removed(2), "{history:?}");
        std::fs::rename(dir.path().join("moved"), &path).expect("mv back");
        history.read(&fd, wd, name);
        assert!(!history.only_removed(2), "{history:?}");
    }

    /// A link on the way made anew once (renamed over, or removed and made again) is one the
    /// way decides on; twice is a loss whatever the way; a link leaving its name alone is
    /// nothing; an overflowed queue is a loss; other names in the link's directory are not
    /// the link.
    #[test]
    fn links_made_anew_are_counted_and_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = new_inotify().expect("inotify");
        let wd =
            rustix::fs::inotify::add_watch(&fd, dir.path(), DIR_ENTRY_EVENTS).expect("add_watch");
        let link = dir.path().join("current");
        std::os::unix::fs::symlink("v1", &link).expect("symlink");
        let mut history = NameHistory::new(0, Arc::default());
        history.note_links(vec![(wd, OsString::from("current"))]);
        // The lock file's own directory is elsewhere: no descriptor matches -1.
        let name = std::ffi::OsStr::new("x.lock");
        assert!(history.read(&fd, -1, name), "the link's creation counts");
        assert!(history.link_made() && history.changed_behind_us(0).is_none());
        history.settle(0, None);
        assert!(!history.link_made());
        std::fs::write(dir.path().join("other"), b"").expect("another name");
        assert!(
            !history.read(&fd, -1, name),
            "another name counts for nothing"
        );
        std::fs::remove_file(&link).expect("rm");
        // A removal alone is no change, but the path may wait for the link to come back.
        assert!(history.read(&fd, -1, name), "the link's removal is counted");
        assert!(!history.link_made() && history.changed_behind_us(0).is_none());
        assert!(history.waits_for_the_path(0));
        std::os::unix::fs::symlink("v1", &link).expect("made again");
        assert!(history.read(&fd, -1, name));
        assert!(history.link_made() && history.changed_behind_us(0).is_none());
        assert!(
            !history.waits_for_the_path(0),
            "a link made again: its way decides, not a wait"
        );
        let new = dir.path().join("current.new");
        std::os::unix::fs::symlink("v2", &new).expect("symlink");
        std::fs::rename(&new, &link).expect("renamed over");
        assert!(history.read(&fd, -1, name));
        assert_eq!(
            history.changed_behind_us(0),
            Some(LossReason::LockDirectoryRemoved),
            "made anew twice: away and back"
        );
        history.settle(0, None);
        assert_eq!(history.changed_behind_us(0), None);
        // Lost events count only around a re-creation of ours, or where others may rename
        // entries on the way: anyone can overflow the queue of a shared directory with files
        // of their own.
        history.events_lost = true;
        assert_eq!(history.changed_behind_us(0), None);
        assert_eq!(
            history.changed_behind_us(1),
            Some(LossReason::LockFileRemoved),
            "another copy's file may have come before our re-creation"
        );
        let way = Way {
            others_may_rename: true,
            ..Way::default()
        };
        let mut history = NameHistory::new(0, Arc::new(way));
        history.events_lost = true;
        assert_eq!(
            history.changed_behind_us(0),
            Some(LossReason::LockFileRemoved),
            "what others may do on the way, lost events may have hidden"
        );
        history.settle(0, Some(Arc::default()));
        history.events_lost = true;
        assert!(
            history.changed_behind_us(0).is_some(),
            "kept across settles"
        );
    }

    /// Two links on the way made anew, each once, may have led the path a third way while one
    /// was new and the other not: a loss, whatever way the path goes now.
    #[test]
    fn two_links_made_anew_are_a_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = new_inotify().expect("inotify");
        let wd =
            rustix::fs::inotify::add_watch(&fd, dir.path(), DIR_ENTRY_EVENTS).expect("add_watch");
        let mut history = NameHistory::new(0, Arc::default());
        history.note_links(vec![(wd, OsString::from("p")), (wd, OsString::from("q"))]);
        let name = std::ffi::OsStr::new("x.lock");
        std::os::unix::fs::symlink("q", dir.path().join("p")).expect("symlink");
        assert!(history.read(&fd, -1, name));
        assert_eq!(history.changed_behind_us(0), None, "one link made anew");
        std::os::unix::fs::symlink("d/x", dir.path().join("q")).expect("symlink");
        assert!(history.read(&fd, -1, name));
        assert_eq!(
            history.changed_behind_us(0),
            Some(LossReason::LockDirectoryRemoved)
        );
    }

    /// A way is within the settled one when it ends in the same directory, entering no other
    /// directory and going through no other link, in any order: a link re-made with an absolute
    /// target is; one that enters another directory, goes through another link, or ends
    /// elsewhere is not.
    #[test]
    fn a_way_within_the_settled_one_ends_there_and_enters_nothing_new() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        for dir in ["v1/run", "v2/run", "other"] {
            std::fs::create_dir_all(b.join(dir)).expect("mkdir");
        }
        std::os::unix::fs::symlink("v1", b.join("current")).expect("symlink");
        let lock_dir = b.join("current/run");
        let settled = way_to(&lock_dir);
        let again = |target: &Path| {
            std::fs::remove_file(b.join("current")).expect("rm");
            std::os::unix::fs::symlink(target, b.join("current")).expect("symlink");
            way_to(&lock_dir)
        };
        assert!(again(&b.join("v1")).within(&settled), "absolute");
        assert!(again(Path::new("./v1")).within(&settled), "through `.`");
        assert!(
            !again(Path::new("other/../v1")).within(&settled),
            "enters `other`"
        );
        assert!(!again(Path::new("v2")).within(&settled), "ends elsewhere");
        std::os::unix::fs::symlink("v1", b.join("inner")).expect("symlink");
        assert!(!again(Path::new("inner")).within(&settled), "another link");
    }

    /// `srv/current -> ../data/rel/v1` (relative, through `..`) and `data/rel -> /abs/rel`
    /// (absolute): every directory entered is listed, those above each target included, and
    /// so is every directory holding a link.
    #[test]
    fn the_way_includes_the_directories_above_each_symlink_target() {
        let base = tempfile::tempdir().expect("tempdir");
        // Resolved, so that the expected paths hold no symlink of the machine's own.
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("abs/rel/v1/run")).expect("mkdir");
        std::fs::create_dir_all(b.join("data")).expect("mkdir");
        std::fs::create_dir_all(b.join("srv")).expect("mkdir");
        std::os::unix::fs::symlink(b.join("abs/rel"), b.join("data/rel")).expect("symlink");
        std::os::unix::fs::symlink("../data/rel/v1", b.join("srv/current")).expect("symlink");
        let way = way_to(&b.join("srv/current/run"));
        // As a set: the absolute link starts again from `/`, through `b`'s ancestors again.
        let entered: BTreeSet<&Path> = way.entered.iter().map(PathBuf::as_path).collect();
        let mut expected: BTreeSet<PathBuf> = b
            .ancestors()
            .filter(|a| a.parent().is_some())
            .map(Path::to_owned)
            .collect();
        expected.extend(
            [
                "srv",
                "data",
                "abs",
                "abs/rel",
                "abs/rel/v1",
                "abs/rel/v1/run",
            ]
            .map(|d| b.join(d)),
        );
        assert_eq!(
            entered,
            expected.iter().map(PathBuf::as_path).collect(),
            "{way:?}"
        );
        assert_eq!(
            way.links,
            [
                (b.join("srv"), OsString::from("current")),
                (b.join("data"), OsString::from("rel"))
            ],
            "{way:?}"
        );
    }

    /// The acquisition's walk goes the same way as [`way_to`], and says so (its watches are
    /// added along it, and the watch's thread adds them again along `way_to`'s).
    #[test]
    fn the_walk_goes_the_way_the_watch_follows() {
        use crate::lockfile::dir::{open_dir, tests::private_plan};
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("abs/rel/v1")).expect("mkdir");
        std::fs::create_dir_all(b.join("data")).expect("mkdir");
        std::fs::create_dir_all(b.join("srv")).expect("mkdir");
        std::os::unix::fs::symlink(b.join("abs/rel"), b.join("data/rel")).expect("symlink");
        std::os::unix::fs::symlink("../data/rel/v1", b.join("srv/current")).expect("symlink");
        std::fs::create_dir_all(b.join("abs/rel/v1/run/sub")).expect("mkdir");
        // A per-user directory, as the plan has it.
        std::fs::set_permissions(
            b.join("abs/rel/v1/run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("../abs/rel/v1/run/..", b.join("srv/up")).expect("symlink");
        for lock_dir in [
            b.join("srv/current/run"),
            b.join("srv/current/run/sub/.."),
            b.join("srv/up/run"),
            b.join("srv/current/run/"),
        ] {
            for round in ["made by the walk's caller", "there already"] {
                let dir = open_dir(&private_plan(&lock_dir), false).expect("open_dir");
                let way = way_to(&lock_dir);
                assert_eq!(*dir.way, way, "{}: {round}", lock_dir.display());
                assert_eq!(
                    way.entered.last(),
                    Some(&b.join("abs/rel/v1/run")),
                    "{}: the last is the lock directory",
                    lock_dir.display()
                );
            }
        }
    }

    /// Whether others may rename on the way is read from the modes as they are when the way is
    /// looked at: a directory made writable by its group since counts, a sticky one does not.
    #[test]
    fn the_way_says_whether_others_may_rename_on_it_now() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("a/run")).expect("mkdir");
        let lock_dir = b.join("a/run");
        let before = way_to(&lock_dir).others_may_rename;
        for (mode, others) in [(0o2775, true), (0o1777, before), (0o755, before)] {
            std::fs::set_permissions(b.join("a"), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            assert_eq!(way_to(&lock_dir).others_may_rename, others, "{mode:o}");
        }
    }

    /// A path that leads nowhere stops where it does, with what it went through so far.
    #[test]
    fn the_way_stops_where_the_path_leads_nowhere() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        let way = way_to(&b.join("missing/run"));
        assert_eq!(way.entered.last(), Some(&b), "{way:?}");
        assert!(way.links.is_empty(), "{way:?}");
    }
}
