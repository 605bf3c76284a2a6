//! Restoring exclusion when only the lock file was removed: re-created, locked, recorded and
//! verified under the same checks as an acquisition, or found lost.
//! Must not: re-create anything after a release or a loss, nor report the loss itself.
//!
//! Over 400 lines by its unit tests: the re-creation itself is under 400.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::dir::check_dir;
use super::held::Now;
use super::ofd::{lock_exclusive, retry_eintr};
use super::open::{Made, create_unnamed, set_new_file_owner_and_mode};
use super::record::{without_keep_mark, write_or_unknown};
use super::walk::{Walked, walk_dir};
use crate::plan::LockPlan;
use std::os::fd::OwnedFd;

use crate::loss::LossReason;

use super::watch::{NameHistory, WatchHandle, lock_change};

/// The rate limit of re-creation: a removal that would make more than `MAX_RECREATIONS`
/// re-creations within [`RECREATION_WINDOW`] is a loss. An administrator or a tmp cleaner removes
/// the file once; logout removes its directory too (a loss in any case); a process that removes
/// it 17 times in a second is fighting the holder, and each round costs the holder a wake-up,
/// a walk of the path and a dozen system calls, and gives a copy started then a chance to make
/// the file first. Nothing is kept per re-creation but its time (the lock's descriptors stay
/// the same, see `Files`), so the limit is on the rate alone, never on the holder's life.
pub(super) const MAX_RECREATIONS: usize = 16;
/// See [`MAX_RECREATIONS`].
pub(super) const RECREATION_WINDOW: Duration = Duration::from_secs(1);

/// Would one more re-creation at `now` make more than [`MAX_RECREATIONS`] within
/// [`RECREATION_WINDOW`], given the times of the latest ones (`recent`, oldest first)?
fn too_often(recent: &VecDeque<Instant>, now: Instant) -> bool {
    recent.len() >= MAX_RECREATIONS
        && recent
            .get(recent.len() - MAX_RECREATIONS)
            .is_some_and(|&oldest| now.saturating_duration_since(oldest) < RECREATION_WINDOW)
}

/// What [`WatchHandle::recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The path leads to the file the lock is on: nothing is lost.
    Held,
    /// Our lock file was removed, and we made and locked a new one at the same path.
    Recreated,
    /// The lock was released meanwhile: there is nothing to watch any more.
    Released,
    /// The lock no longer excludes other copies: a loss.
    Lost,
}

/// What a watch decided on looking at the path after reading its events (see
/// [`WatchHandle::judge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judgement {
    /// Still ours: nothing to do.
    Held,
    /// Our file was seen removed, and nothing else: made again at the path.
    Recreated,
    /// Lost just now, for this reason: the watch reports it.
    Lost(LossReason),
    /// Released meanwhile, or lost before: nothing to watch or report any more.
    Over,
    /// The path leads nowhere for now, a link on the way seen removed and nothing else (see
    /// [`NameHistory::waits_for_the_path`]): nobody can take the instance through it, and
    /// nothing is settled; the next change decides.
    Nowhere,
}

impl WatchHandle {
    /// Looks at the path, after the events of `inotify` (the instance and our directory's
    /// watch in it, when there is one) have been read into `history`, and decides: a file
    /// found removed is re-created only if its removal was seen, with no file made at its name
    /// by anyone else since (see [`NameHistory`]); a removal found before its event was read is
    /// waited for a moment first. A path leading nowhere for now, a link on the way seen
    /// removed and nothing else, is waited out (see [`NameHistory::waits_for_the_path`]). Any
    /// other change is a loss, and so is a file made at our name
    /// by someone else since the path last led to our file, even if it leads there again, and
    /// a link on the way made anew, unless the path goes the way it went then.
    pub(super) fn judge(
        &self,
        history: &mut NameHistory,
        inotify: Option<(&OwnedFd, i32)>,
    ) -> Judgement {
        // Re-created in an earlier round of this look (see `Recovery::Recreated` below).
        let mut recreated = false;
        loop {
            let change = lock_change(self);
            // Looked at after the path, so that it is the way the path went when it was seen.
            // With events lost, for its modes too: whether others may rename on the way now
            // (made group-writable since the acquisition) decides what the loss may hide.
            let link_made = history.link_made();
            let way_now = (link_made || history.events_lost()).then(|| Arc::new(self.way_now()));
            if let Some(way) = &way_now {
                history.note_others_may_rename(way.others_may_rename);
            }
            let way_now = way_now.filter(|_| link_made);
            let way_left = way_now.as_deref().is_some_and(|way| history.way_left(way));
            let Some((reason, nowhere)) = change else {
                let behind = if way_left {
                    Some(LossReason::LockDirectoryRemoved)
                } else {
                    history.changed_behind_us(self.recreated())
                };
                if let Some(reason) = behind {
                    tracing::debug!(path = %self.path().display(),
                        "the lock path left our file, in a way another copy may have used, and came back");
                    return self.lost(reason);
                }
                // What happened while we looked is settled only by a look that follows it: a
                // link flipped away before the look and back after it would otherwise be
                // taken, once read, for a link made once.
                if let Some((fd, dir_watch)) = inotify
                    && history.read(fd, dir_watch, self.file_name())
                {
                    continue;
                }
                history.settle(self.recreated(), way_now);
                return if recreated {
                    Judgement::Recreated
                } else {
                    Judgement::Held
                };
            };
            if let Some((fd, dir_watch)) = inotify {
                if nowhere {
                    // What was read after the look (the link made again at once, as busybox's
                    // `ln -sf` does) is judged by a look that follows it, as above.
                    let counted = history.await_removal(fd, dir_watch, self.file_name(), true);
                    // Not once what was read decides a loss already: a flood of events would
                    // keep the watch looking.
                    if (history.read(fd, dir_watch, self.file_name()) || counted)
                        && !history.path_may_have_left()
                        && !history.events_lost()
                    {
                        continue;
                    }
                } else if !history.only_removed(self.recreated()) {
                    history.await_removal(fd, dir_watch, self.file_name(), false);
                }
            }
            let waits = match inotify {
                Some((fd, dir_watch))
                    if nowhere && history.waits_for_the_path(self.recreated()) =>
                {
                    if history.breaks_at_a_removed_link(fd, &self.way_now()) {
                        true
                    } else if history.read(fd, dir_watch, self.file_name()) {
                        // The link made again since the look (`ln -s` right after `rm`), so
                        // that the path breaks nowhere now: its event is queued by then, and a
                        // look that follows it decides.
                        continue;
                    } else {
                        false
                    }
                }
                _ => false,
            };
            if waits {
                tracing::debug!(path = %self.path().display(),
                    "the lock path leads nowhere for now (a link on the way removed), and our \
                     directory still has our file: waiting for the next change");
                return Judgement::Nowhere;
            }
            if way_left || !history.only_removed(self.recreated()) {
                tracing::debug!(path = %self.path().display(),
                    "the lock path stopped leading to our file, and it was not seen only removed \
                     (unwatched then, or someone else made a file there): not re-created");
                return self.lost(reason);
            }
            return match self.recover() {
                Recovery::Held => Judgement::Held,
                Recovery::Recreated => {
                    // Our new file's own event read now, before anyone is told of it (see
                    // `tell_recreated`), and the path looked at again with it, as after any
                    // event read: anything else read with it decides there.
                    if let Some((fd, dir_watch)) = inotify {
                        let _ = history.read(fd, dir_watch, self.file_name());
                        self.tell_recreated();
                        recreated = true;
                        continue;
                    }
                    self.tell_recreated();
                    Judgement::Recreated
                }
                Recovery::Released => Judgement::Over,
                Recovery::Lost => Judgement::Lost(reason),
            };
        }
    }

    /// What the watch found by the time it was told to stop for a release: the loss that
    /// nothing reported, if any, by [`WatchHandle::judge`]'s rules (a removal it saw, and only
    /// that, is re-created as the watch would have, and the release removes it again).
    pub(super) fn verdict(
        &self,
        history: &mut NameHistory,
        inotify: Option<(&OwnedFd, i32)>,
    ) -> Option<LossReason> {
        match self.judge(history, inotify) {
            Judgement::Lost(reason) => Some(reason),
            Judgement::Held | Judgement::Recreated | Judgement::Over | Judgement::Nowhere => None,
        }
    }

    /// Gives the lock up as lost for `reason`, unless released or lost already.
    fn lost(&self, reason: LossReason) -> Judgement {
        let mut now = self.shared.now();
        if now.released || now.lost {
            return Judgement::Over;
        }
        now.lost = true;
        Judgement::Lost(reason)
    }

    /// Called when [`WatchHandle::check_path`] found a change: restores exclusion if the only
    /// change is that someone removed our lock file (an administrator cleaning `/run/lock`, a
    /// tmp cleaner). Then the file we hold has no name at all (`st_nlink == 0`) while our
    /// directory is still the one its path leads to, with every check of the way to it that
    /// an acquisition makes; nobody else can have locked a file at the path without creating
    /// it, so we create it (`O_CREAT | O_EXCL`, its mode set as on acquisition), lock it without
    /// waiting, write our record and verify that the path leads to it and that it is held.
    /// Any failure is a loss, exactly as before: another copy made the file first (`EEXIST`)
    /// or locked it, a file renamed over ours (our file unlinked *and* another one at the path),
    /// our file renamed away (it still has a name), the directory moved, removed, replaced or
    /// mounted over, a symlink on the way retargeted; and a removal that comes too often (see
    /// [`MAX_RECREATIONS`]).
    ///
    /// The new file takes the removed one's place in the lock's descriptors (see `Files`), and
    /// whoever follows [`LockFileRecreations`](crate::LockFileRecreations) is told. Serialised
    /// with the other watches and with release; once a loss is found, nothing is re-created any
    /// more.
    pub(crate) fn recover(&self) -> Recovery {
        let mut now = self.shared.now();
        if now.released {
            return Recovery::Released;
        }
        if now.lost {
            return Recovery::Lost;
        }
        if self.path_as(now.dev, now.ino).is_none() {
            // Another watch re-created it already, or the change went away.
            return Recovery::Held;
        }
        // Said once the shared state is let go: a log line may block (a subscriber writing to a
        // stderr nobody reads), and the release and the other watches wait for that state.
        match self.recreate(&mut now) {
            // Looked at once ours is at the path again, as an acquisition looks once it holds
            // (see `copy_in_the_other_dir`): a copy that took the other system directory's file
            // while ours had no name saw nothing here, and runs (a review: both ran).
            Ok(()) if super::probe::copy_in_the_other_dir(&self.shared.plan).is_some() => {
                now.lost = true;
                drop(now);
                tracing::debug!(path = %self.path.display(),
                    "re-created the lock file, but a copy holds the other system lock directory's");
                Recovery::Lost
            }
            Ok(()) => {
                drop(now);
                tracing::warn!(path = %self.path.display(),
                    "the lock file was removed; re-created it, and the instance is still held");
                Recovery::Recreated
            }
            Err(why) => {
                now.lost = true;
                drop(now);
                tracing::debug!(path = %self.path.display(), why, "the lock file cannot be re-created");
                Recovery::Lost
            }
        }
    }

    /// The body of [`WatchHandle::recover`], with the shared state locked; `Err` says why not.
    fn recreate(&self, now: &mut Now) -> std::result::Result<(), &'static str> {
        let shared = &*self.shared;
        let (plan, lock_dir) = (&shared.plan, &shared.lock_dir);
        let started = Instant::now();
        if too_often(&now.recent, started) {
            return Err("removed too often (more than MAX_RECREATIONS within RECREATION_WINDOW)");
        }
        // Held only here, under the lock of `now`, and never after release (see `Files`).
        let Some(files) = shared.files.upgrade() else {
            return Err("released");
        };
        // Unlinked, not renamed away or linked elsewhere: it has no name left.
        match rustix::fs::fstat(files.lent()) {
            Ok(st) if st.st_nlink == 0 => {}
            Ok(_) => return Err("our file still has a name elsewhere"),
            Err(_) => return Err("cannot stat our file"),
        }
        // Our directory is still the one the path leads to, checked all the way as an
        // acquisition checks it.
        let euid = rustix::process::geteuid().as_raw();
        let Ok(dir_st) = rustix::fs::fstat(&*self.dir) else {
            return Err("cannot stat our directory");
        };
        match walk_dir(plan, euid) {
            Ok(Walked::Found(_, st, _))
                if (st.st_dev, st.st_ino) == (dir_st.st_dev, dir_st.st_ino)
                    && check_dir(plan, &st, euid).is_ok() => {}
            Ok(_) => return Err("the path leads to another directory"),
            Err(_) => return Err("the way to the directory fails its checks"),
        }
        crate::test_hooks::stop_at(crate::test_hooks::Hook::BeforeRecreate);
        // Made under a temporary name, and given its name only once it has its owner, mode,
        // lock and our record (see `create_unnamed`): nobody meets it any other way.
        let made = create_unnamed(
            &self.dir,
            self.file_name.as_os_str(),
            plan.file_mode,
            |file, st| {
                set_new_file_owner_and_mode(plan, file, &self.path, st, euid, lock_dir)?;
                write_or_unknown(file, without_keep_mark(&now.record), &self.path)
                    .map(|_| ())
                    .map_err(|e| {
                        crate::error::Error::io("cannot write holder record to", &self.path, e)
                    })
            },
        );
        let file = match made {
            Ok(Made::Named(file)) => Some(file),
            Ok(Made::Exists) => return Err("another file is at the path (another copy's)"),
            Ok(Made::Unsupported) => None,
            Err(_) => return Err("cannot set the new file's owner and mode, or write our record"),
        };
        let prepared = file.is_some();
        let file = match file {
            Some(file) => file,
            None => self.create_at_name(plan)?,
        };
        let Ok(mut st) = rustix::fs::fstat(&file) else {
            return Err("cannot stat the new file");
        };
        // Ours, locked: removed again (while still locked) if anything below fails.
        let (dev, ino) = (st.st_dev, st.st_ino);
        let abandon = |why| {
            if self.in_dir_as(dev, ino).is_none() {
                let _ =
                    rustix::fs::unlinkat(&*self.dir, self.file_name.as_os_str(), AtFlags::empty());
            }
            Err(why)
        };
        if !prepared
            && set_new_file_owner_and_mode(plan, &file, &self.path, &mut st, euid, lock_dir)
                .is_err()
        {
            return abandon("cannot set the new file's owner and mode");
        }
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
            return abandon("the new file is not a regular file with one name");
        }
        // No room for it leaves the file empty: "holder unknown", and still the lock.
        // Made by us: ours to remove, so its record carries no keep mark (`LockRecord::keep`).
        if !prepared && write_or_unknown(&file, without_keep_mark(&now.record), &self.path).is_err()
        {
            return abandon("cannot write our record");
        }
        if !self.verify_held_as(dev, ino) {
            return abandon("the path does not lead to the new file, held");
        }
        if files.replace(&file).is_err() {
            return abandon("cannot put the new file in place of the removed one");
        }
        // Its own descriptor closes here: the lock's descriptors refer to it now.
        drop(file);
        now.recreated += 1;
        if now.recent.len() >= MAX_RECREATIONS {
            now.recent.pop_front();
        }
        now.recent.push_back(started);
        (now.dev, now.ino, now.keep_file) = (dev, ino, false);
        Ok(())
    }

    /// The new file for [`WatchHandle::recreate`] where it cannot be made under a temporary name (see
    /// `create_unnamed`): created at its name, and locked at once.
    fn create_at_name(&self, plan: &LockPlan) -> std::result::Result<OwnedFd, &'static str> {
        let flags = OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY
            | OFlags::NONBLOCK;
        let file = match retry_eintr(|| {
            rustix::fs::openat(
                &*self.dir,
                self.file_name.as_os_str(),
                flags,
                Mode::from_raw_mode(plan.file_mode),
            )
        }) {
            Ok(file) => file,
            Err(Errno::EXIST) => return Err("another file is at the path (another copy's)"),
            Err(_) => return Err("cannot create the file"),
        };
        // Locked before anything else: until then another copy may open and lock it (it is
        // empty, a lock file like any other), and then it is theirs, never ours to remove.
        if lock_exclusive(&file, false).is_err() {
            return Err("another copy locked the new file first");
        }
        Ok(file)
    }

    /// Tells whoever follows [`LockFileRecreations`](crate::LockFileRecreations) of the
    /// re-creations so far. Called by the watch once it has read the events of its own
    /// re-creation (see [`WatchHandle::judge`]), so that a process handed the new file (`run`'s
    /// keeper) never finds them unread in the watch's instance, where they would look like
    /// another copy's file.
    fn tell_recreated(&self) {
        let now = self.shared.now();
        if let Some(recreations) = &now.recreations {
            recreations.send_replace(now.recreated);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use super::*;
    use crate::lockfile::attempt::{Attempt, lock};
    use crate::lockfile::dir::{open_dir, tests::private_plan};

    /// The 17th re-creation within a second is refused; one a second later than the 16th
    /// before it is not, however many came before.
    #[test]
    fn the_rate_limit_counts_the_latest_re_creations_only() {
        let start = Instant::now();
        let at = |ms: u64| {
            start
                .checked_add(Duration::from_millis(ms))
                .expect("an instant")
        };
        let mut recent = VecDeque::new();
        for i in 0..MAX_RECREATIONS as u64 {
            assert!(!too_often(&recent, at(i)), "re-creation {i}");
            recent.push_back(at(i));
        }
        assert!(too_often(&recent, at(MAX_RECREATIONS as u64)));
        assert!(too_often(&recent, at(999)));
        assert!(!too_often(&recent, at(1000)));
        // An instant before the oldest (never: the clock is monotonic) is not a panic.
        if let Some(before) = start.checked_sub(Duration::from_millis(1)) {
            assert!(too_often(&recent, before));
        }
    }

    /// A re-created file takes the removed one's place in the lent descriptor (same number),
    /// the count goes up, and a follower of re-creations is told once the watch tells it.
    #[test]
    fn a_re_created_file_takes_the_lent_descriptors_place() {
        use std::os::unix::fs::MetadataExt;
        let base = tempfile::tempdir().expect("tempdir");
        let plan = private_plan(&base.path().join("locks"));
        let mut dir = open_dir(&plan, false).expect("dir");
        let Attempt::Acquired(held, None) = lock(&plan, &mut dir, false).expect("lock") else {
            panic!("a fresh file is acquired");
        };
        let path = plan.dir.join(&plan.file_name);
        let number = held.as_fd().as_raw_fd();
        let mut recreations = held.recreations();
        let handle = held.watch_handle();
        for round in 1..=3u64 {
            std::fs::remove_file(&path).expect("remove");
            assert_eq!(handle.recover(), Recovery::Recreated, "round {round}");
            // As the watch does once it has read the new file's own event.
            handle.tell_recreated();
            assert_eq!(held.as_fd().as_raw_fd(), number, "the same number");
            let lent = rustix::fs::fstat(held.as_fd()).expect("fstat");
            let at_path = std::fs::metadata(&path).expect("re-created");
            assert_eq!((lent.st_dev, lent.st_ino), (at_path.dev(), at_path.ino()));
            assert!(recreations.has_changed().expect("open"));
            assert_eq!(*recreations.borrow_and_update(), round);
        }
        held.release().expect("release");
        assert!(recreations.has_changed().is_err(), "ended by the release");
        assert!(!path.exists());
    }
}
