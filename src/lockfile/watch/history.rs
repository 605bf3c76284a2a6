//! The watch's memory (`NameHistory`): what inotify said of our file's name, and of the
//! symlinks on the way, since the path was last seen leading to our file; it decides whether a
//! lock file found gone may be re-created, and whether the path may have led elsewhere.
//! Must not: report a loss or re-create the file itself (see `recover.rs` and `watcher.rs`).
//!
//! Over 400 lines by its unit tests: the rules themselves are under 400.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::loss::LossReason;

use super::DIR_ENTRY_EVENTS;
use super::way::Way;

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
pub(in crate::lockfile) struct NameHistory {
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
    pub(in crate::lockfile) fn new(recreated: u64, way: Arc<Way>) -> Self {
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
    pub(in crate::lockfile) fn note_links(&mut self, links: Vec<(i32, OsString)>) {
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
    pub(in crate::lockfile) fn note_others_may_rename(&mut self, others_may_rename: bool) {
        self.others_may_rename |= others_may_rename;
    }

    /// Were events lost (an overflowed queue) since the path last led to our file? Then the
    /// way's modes are looked at again before judging (see
    /// [`NameHistory::note_others_may_rename`]).
    pub(in crate::lockfile) fn events_lost(&self) -> bool {
        self.events_lost
    }

    /// Reads every pending event of `fd` (a non-blocking inotify instance) about `name` in the
    /// directory watched as `dir_watch`, and about the symlinks on the way. Whether any of
    /// them counted.
    pub(in crate::lockfile) fn read(
        &mut self,
        fd: &OwnedFd,
        dir_watch: i32,
        name: &std::ffi::OsStr,
    ) -> bool {
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
    pub(in crate::lockfile) fn settle(&mut self, recreated: u64, way_now: Option<Arc<Way>>) {
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
    pub(in crate::lockfile) fn watched_late(&mut self) {
        self.confirmed = false;
    }

    /// Was a link made at the name of a symlink on the way since the path last led to our
    /// file? Then the way the path goes now must be looked at: see [`NameHistory::way_left`].
    pub(in crate::lockfile) fn link_made(&self) -> bool {
        self.links.iter().any(|l| l.made > 0)
    }

    /// Does `way_now` (the way the path goes now, looked at since a link was made on it) leave
    /// the way it went when it last led to our file (see [`Way::within`])? Then the path led
    /// elsewhere, by the new way, at least for a moment: its links there were not watched.
    pub(in crate::lockfile) fn way_left(&self, way_now: &Way) -> bool {
        !way_now.within(&self.settled_way)
    }

    /// May the path have led elsewhere since it last led to our file, whatever it leads to
    /// now: a directory on the way moved or removed, or a symlink on the way made anew more
    /// than once (away and back), or more than one made anew (see [`NameHistory`]).
    pub(in crate::lockfile) fn path_may_have_left(&self) -> bool {
        self.path_left
            || self.links.iter().any(|l| l.made > 1)
            || self.links.iter().filter(|l| l.made > 0).count() > 1
    }

    /// May our file, found gone from the path, be re-created (`recreated`: our re-creations so
    /// far)? Only if its removal was seen and nobody else has made a file at the name since.
    pub(in crate::lockfile) fn only_removed(&self, recreated: u64) -> bool {
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
    pub(in crate::lockfile) fn waits_for_the_path(&self, recreated: u64) -> bool {
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
    pub(in crate::lockfile) fn breaks_at_a_removed_link(
        &self,
        fd: &OwnedFd,
        way_now: &Way,
    ) -> bool {
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
    pub(in crate::lockfile) fn changed_behind_us(&self, recreated: u64) -> Option<LossReason> {
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
    pub(in crate::lockfile) fn await_removal(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockfile::new_inotify;

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
}
