//! The held lock: the file as locked, its record written in place, its descriptors kept until
//! release, and the release itself (removed while still locked, then unlocked), also on `Drop`.
//! Must not: decide whether a lock may be taken; that is the attempt's (`attempt.rs`).
//! Over 400 lines: the descriptors ([`Files`]), what the watches share ([`Shared`]) and the
//! release that needs both stay private together here, with their unit tests.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Stat};
use rustix::io::Errno;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::loss::LossReason;
use crate::plan::LockPlan;

use super::dir::LockDir;
use super::ofd::{is_held, lock_exclusive, retry_eintr};
use super::open::{Removal, remove_unheld};
use super::record::{LockRecord, write_or_unknown};
use super::watch::WatchHandle;
use super::watch::lock_change_of;

/// A lock file this process holds. Dropping it removes the file (if it is still ours, and this
/// acquisition created it or took it over from a crashed holder) while the lock is held, then
/// unlocks.
#[derive(Debug)]
pub(crate) struct HeldLock {
    /// The descriptors of the lock, owned here alone (see [`Files`]).
    files: Arc<Files>,
    dir: Arc<OwnedFd>,
    file_name: OsString,
    path: PathBuf,
    released: bool,
    /// The length of the longest record written, which a shorter one is padded to.
    record_len: usize,
    /// The process that took the lock. After a `fork` the child shares our open file
    /// description, and with it the lock: only this process may remove the file.
    pid: u32,
    /// What the lock's watches share with it: which file the lock is on now.
    shared: Arc<Shared>,
}

/// How many times [`HeldLock::move_above`] may move the lock's descriptor: once above a wait's
/// inotify instance, once above the watch's.
const MAX_MOVES: usize = 2;

/// The descriptors of a held lock: the file as locked, and its duplicates above the inotify
/// instances that watch it ([`HeldLock::move_above`]), the highest last. The highest is the one
/// [`HeldLock::as_fd`] lends; it no longer changes once the guard exists. They all refer to the
/// file the lock is on now: a re-created file ([`WatchHandle::recover`]) takes the place of the
/// removed one in each ([`Files::replace`]), so that a borrower of the lent descriptor sees the
/// new file, never the number closed or reused for another file (`run`'s COMMAND holds its own
/// duplicate of the file it was given), and nothing accumulates however often the file is
/// re-created. Owned by the [`HeldLock`] alone (its watches hold a [`Weak`] reference, used only
/// under [`Shared::now`] and never after release), so that dropping the lock closes them all,
/// and frees the lock, before release returns.
///
/// [`Weak`]: std::sync::Weak
#[derive(Debug)]
pub(super) struct Files {
    first: OwnedFd,
    moved: [OnceLock<OwnedFd>; MAX_MOVES],
}

impl Files {
    /// The descriptor of the file the lock is on now: the highest.
    pub(super) fn lent(&self) -> &OwnedFd {
        self.moved
            .iter()
            .rev()
            .find_map(OnceLock::get)
            .unwrap_or(&self.first)
    }

    /// Adds `fd`, a duplicate numbered above the others, as the one lent; gives it back when
    /// there is no room. Called only with [`Shared::now`] locked, and only before the guard
    /// exists (the lent number is stable from then on).
    fn push(&self, fd: OwnedFd) -> std::result::Result<(), OwnedFd> {
        match self.moved.iter().find(|slot| slot.get().is_none()) {
            Some(slot) => slot.set(fd),
            None => Err(fd),
        }
    }

    /// Makes every descriptor of the lock refer to `file` (a re-created lock file, locked), the
    /// lent one first: the removed file is closed here, the numbers stay. Called only with
    /// [`Shared::now`] locked. An error on the lent one leaves it on the removed file; one on
    /// another (never seen: each number is open and ours) leaves that one there, harmlessly.
    pub(super) fn replace(&self, file: &OwnedFd) -> rustix::io::Result<()> {
        let lent = self.lent();
        refer_to(lent, file)?;
        let others =
            std::iter::once(&self.first).chain(self.moved.iter().filter_map(OnceLock::get));
        for fd in others.filter(|fd| fd.as_raw_fd() != lent.as_raw_fd()) {
            if let Err(e) = refer_to(fd, file) {
                tracing::debug!(error = %e, "cannot put the re-created lock file in place of an older descriptor");
            }
        }
        Ok(())
    }
}

/// Makes the descriptor `fd` refer to `file` from now on, in one step (`dup3`, close-on-exec as
/// every descriptor of the lock): whoever borrowed `fd` sees the new file, and never a moment
/// when the number is closed (and could be reused for another file).
#[allow(unsafe_code)]
fn refer_to(fd: &OwnedFd, file: &OwnedFd) -> rustix::io::Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: `number` names `fd`'s descriptor, open and owned by `fd` for longer than this
    // call, and is never closed (`ManuallyDrop`): `fd` stays its only owner. `dup3` only changes
    // which open file the number refers to, atomically; it never leaves it closed.
    let mut number = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(fd.as_raw_fd()) });
    rustix::io::dup3(file, &mut number, rustix::io::DupFlags::CLOEXEC)
}

/// The part of a held lock that its watches share with it: a watch that finds the lock file
/// unlinked re-creates it ([`WatchHandle::recover`]), and from then on the lock is on the new
/// file — the one release removes, and the one the watches compare the path with.
#[derive(Debug)]
pub(super) struct Shared {
    now: Mutex<Now>,
    pub(super) files: std::sync::Weak<Files>,
    /// What re-creating the file needs: the checks of the directory and of a new file.
    pub(super) plan: LockPlan,
    pub(super) lock_dir: LockDir,
}

/// Which file the lock is on, and what a re-creation must know.
#[derive(Debug)]
pub(super) struct Now {
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// How many times the file was re-created in all.
    pub(super) recreated: u64,
    /// When the latest re-creations were made, oldest first: at most
    /// [`MAX_RECREATIONS`](super::recover::MAX_RECREATIONS), for the rate limit.
    pub(super) recent: VecDeque<Instant>,
    /// Tells [`LockFileRecreations`](crate::LockFileRecreations) of each re-creation: made by
    /// the first call of [`HeldLock::recreations`], and dropped on release, which ends them.
    pub(super) recreations: Option<watch::Sender<u64>>,
    /// The file was there, empty, before we took it, or a crashed holder's record says it was
    /// ([`LockRecord::keep`], written by earlier versions): someone else's (or a holder's that
    /// died before writing its record). Nothing of ours is ever written into it, and it is
    /// never removed nor emptied: what its owner, or COMMAND, writes into it while we hold it
    /// is theirs (a review: `flock`-style `run --lock-file job.log … >> job.log` lost the
    /// log, emptied on release). Refused copies are told the holder is unknown. A re-created
    /// file is ours.
    pub(super) keep_file: bool,
    /// The last record written, or for a kept file the one it would get: a re-created file
    /// gets it.
    pub(super) record: Vec<u8>,
    /// Released (or being released): nothing is re-created any more.
    pub(super) released: bool,
    /// A loss was found: nothing is re-created any more (a loss is never taken back).
    pub(super) lost: bool,
    /// Found at release: the path had stopped leading to our file and no watch had seen it
    /// (the holder was stopped, or the watch was off). See [`HeldLock::lost_at_release`].
    pub(super) lost_at_release: Option<LossReason>,
    /// Left by the watch as it stopped for the release, from every event it had: whether the
    /// instance had been lost, unseen, by then (see `WatchHandle::verdict`). The release takes
    /// it instead of looking at the path itself: what happens after the program decided to
    /// release is no loss of its work.
    pub(super) watch_verdict: Option<Option<LossReason>>,
}

/// See [`HeldLock::release_report`].
pub(crate) struct ReleaseReport(Arc<Shared>);

impl ReleaseReport {
    /// How the lock was lost before its release without anything reporting it: `None` when it
    /// was still ours (or a watch had reported the loss), or when it is not released yet.
    pub(crate) fn lost_unnoticed(&self) -> Option<LossReason> {
        self.0.now().lost_at_release
    }

    /// Whether the lock was ours until its release: no loss seen by a watch, none found by
    /// the release.
    pub(crate) fn ours_to_the_end(&self) -> bool {
        let now = self.0.now();
        !now.lost && now.lost_at_release.is_none()
    }
}

impl Shared {
    pub(super) fn now(&self) -> MutexGuard<'_, Now> {
        // A panic elsewhere while it was held leaves nothing half-done that matters here.
        self.now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl HeldLock {
    /// The lock just taken on `file` (`st` is its `fstat`), in `lock_dir`, at `path`;
    /// `keep_file`: see [`Now::keep_file`].
    pub(super) fn new(
        file: OwnedFd,
        st: &Stat,
        keep_file: bool,
        plan: &LockPlan,
        lock_dir: &LockDir,
        path: PathBuf,
    ) -> HeldLock {
        // What is in it now: our first record (see `placeholder`), which the holder's own
        // overwrites whole, padded to its length; nothing in a file we keep.
        let record_len = rustix::fs::fstat(&file).map_or(0, |now| now.st_size as usize);
        let files = Arc::new(Files {
            first: file,
            moved: [const { OnceLock::new() }; MAX_MOVES],
        });
        let shared = Arc::new(Shared {
            now: Mutex::new(Now {
                dev: st.st_dev,
                ino: st.st_ino,
                recreated: 0,
                recent: VecDeque::new(),
                recreations: None,
                keep_file,
                record: Vec::new(),
                released: false,
                lost: false,
                lost_at_release: None,
                watch_verdict: None,
            }),
            files: Arc::downgrade(&files),
            plan: plan.clone(),
            lock_dir: lock_dir.clone(),
        });
        HeldLock {
            files,
            dir: Arc::clone(&lock_dir.fd),
            file_name: plan.file_name.clone(),
            path,
            released: false,
            record_len,
            pid: std::process::id(),
            shared,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes this a lock handed over by the process that took it (see `handed.rs`), whose
    /// record is `line`, already written (unless the file is kept): re-created files get it,
    /// and release does not remove the file (as in a process other than the one that took it)
    /// unless the lock is claimed first (see [`HeldLock::claim`]).
    pub(super) fn handed(mut self, line: Vec<u8>) -> Self {
        self.pid = 0;
        self.record_len = line.len();
        self.shared.now().record = line;
        self
    }

    /// Makes a handed lock (see [`HeldLock::handed`]) this process's to remove on release, as
    /// the process that took it would have: for the one process that keeps it once that one is
    /// gone (see `HandedLockFile::release`).
    pub(super) fn claim(&mut self) {
        self.pid = std::process::id();
    }

    /// Writes the holder record with one `pwrite` at offset 0 (the file was emptied when
    /// locked). It may be written again, completed (the bus's unique name, once connected): a
    /// reader sees the old line or the new one. A line shorter than one written before is
    /// padded with spaces before its newline to the old length rather than followed by a
    /// truncation, so that the file is one whole record at every moment (see
    /// [`LockRecord::parse_whole`]): a holder killed between a write and a truncation would
    /// otherwise leave a file that the next copy must refuse as not a lock file. A torn read
    /// fails to parse and is read again (see `read_holder`), never taken for a record. With no
    /// room for it (a full file system) the file is left empty instead, "holder unknown" (see
    /// [`write_or_unknown`]).
    ///
    /// A kept file ([`Now::keep_file`]) gets nothing: the line is only kept for a re-created
    /// file, which is ours.
    pub(crate) fn write_record(&mut self, record: &LockRecord) -> Result<()> {
        let mut now = self.shared.now();
        let mut line = LockRecord {
            keep: false,
            ..record.clone()
        }
        .to_line();
        if now.keep_file {
            now.record = line;
            return Ok(());
        }
        if line.len() < self.record_len {
            // `to_line` ends with the newline; JSON allows the spaces before it.
            line.pop();
            line.resize(self.record_len - 1, b' ');
            line.push(b'\n');
        }
        let written = write_or_unknown(self.files.lent(), &line, &self.path)
            .map_err(|e| Error::io("cannot write holder record to", &self.path, e))?;
        // Not written (no room): the file is empty, and a re-creation tries the record again.
        self.record_len = if written { line.len() } else { 0 };
        now.record = line;
        Ok(())
    }

    /// Gives the lock a descriptor numbered above `other` (an inotify instance watching it).
    ///
    /// When a process dies, the kernel closes its descriptors in ascending order but finishes
    /// releasing them in the reverse order; releasing an inotify instance waits for an RCU
    /// grace period (milliseconds). Above it, the lock is released first, so a copy waiting for
    /// it takes over in about a millisecond instead of 5 to 15 (measured by the take-over
    /// benchmark, against `flock(1)`, whose holders have no inotify instance). The lock belongs
    /// to the open file description, which the new descriptor keeps. (The bus connection's
    /// socket, which zbus opens, gets the same order by the inotify instance being made first.)
    pub(crate) fn move_above(&mut self, other: &OwnedFd) -> Result<()> {
        let _now = self.shared.now();
        let lent = self.files.lent();
        if lent.as_raw_fd() > other.as_raw_fd() {
            return Ok(());
        }
        let above = rustix::io::fcntl_dupfd_cloexec(lent, other.as_raw_fd() + 1)
            .map_err(|e| Error::io("cannot duplicate the descriptor of", &self.path, e.into()))?;
        // The one below stays open, on the same file (see `Files`): the lock is
        // released with the open file description's last descriptor, this one, the highest.
        if self.files.push(above).is_err() {
            tracing::debug!(path = %self.path.display(), "no room to move the lock's descriptor");
        }
        Ok(())
    }

    /// A receiver told the count of re-creations after each (see [`WatchHandle::recover`]),
    /// closed once the lock is released.
    pub(crate) fn recreations(&self) -> watch::Receiver<u64> {
        let mut now = self.shared.now();
        let count = now.recreated;
        now.recreations
            .get_or_insert_with(|| watch::channel(count).0)
            .subscribe()
    }

    /// Tells, once this lock is released, whether the release found the path no longer leading
    /// to our file, unseen by any watch until then.
    pub(crate) fn release_report(&self) -> ReleaseReport {
        ReleaseReport(Arc::clone(&self.shared))
    }

    /// What a periodic re-check needs, without the lock itself.
    pub(crate) fn watch_handle(&self) -> WatchHandle {
        WatchHandle {
            dir: Arc::clone(&self.dir),
            file_name: self.file_name.clone(),
            path: self.path.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Removes the file while still holding the lock (only if the path is still our file), then
    /// unlocks by closing. A file that was there, empty, before we took it is not ours to
    /// remove: it is left as it is (see `Now::keep_file`).
    ///
    /// In any process other than the one that took the lock (a child after `fork`) it only
    /// closes this process's descriptor: the open file description, and the lock with it, is
    /// shared with the process that took it, which still holds it and may still need the file.
    pub(crate) fn release(mut self) -> Result<()> {
        self.release_in_place()
    }

    fn release_in_place(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        if std::process::id() != self.pid {
            tracing::debug!(path = %self.path.display(), acquired_by = self.pid,
                "lock released in a process other than the one that took it (forked, or handed it): its file is left as it is");
            return Ok(());
        }
        // Held until the file is gone: a watch re-creates nothing once it sees `released`.
        let mut now = self.shared.now();
        now.released = true;
        // Ends the watchers of re-creations: there will be none.
        now.recreations = None;
        // Checked with `released` set, under the same lock as a re-creation: no watch can be
        // re-creating the file at this moment, so a change seen here is one nobody handled.
        now.lost_at_release = match now.watch_verdict.take() {
            // Its verdict may have found the loss itself (marking it `lost`): reported here.
            Some(verdict) => verdict,
            // No watch (off, or stopped watching), and no loss found: the path as it is now.
            None if !now.lost => lock_change_of(&self.watch_handle(), now.dev, now.ino),
            None => None,
        };
        // The file ours at its path, but its lock let go (no event tells of that).
        if now.lost_at_release.is_none()
            && !now.lost
            && self.watch_handle().let_go_as(now.dev, now.ino)
        {
            now.lost_at_release = Some(LossReason::LockLetGo);
        }
        if let Some(why) = self.shared_with_another(&now) {
            tracing::debug!(path = %self.path.display(), why,
                "lock file not removed by the release: another process may still hold the lock, or it went otherwise");
            return Ok(());
        }
        // A kept file is left as it is (see `Now::keep_file`).
        if !now.keep_file && self.watch_handle().in_dir_as(now.dev, now.ino).is_none() {
            match rustix::fs::unlinkat(&*self.dir, self.file_name.as_os_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => {
                    return Err(Error::io("cannot remove lock file", &self.path, e.into()));
                }
            }
        }
        // Closing `file` (when self drops) releases the lock: waiters on this inode wake, see
        // that the path no longer names it, and retry on a fresh file.
        Ok(())
    }

    /// Does another process still hold the lock, or can that not be ruled out? Why, if so.
    /// `None` when this process alone holds it, or the path no longer names our file (nothing
    /// there is ours to remove). Called on release with [`Shared::now`] locked (`now`).
    ///
    /// A child made by `fork` after acquiring shares the open file description, and with it
    /// the lock, which our own descriptors cannot tell apart from ours. So: the file is opened
    /// afresh through the directory (a new open file description, unlocked), every descriptor
    /// of the lock is made to refer to it ([`Files::replace`]: the lent number stays valid,
    /// this process lets go of the old description), and the new one is locked, without
    /// waiting. It succeeds when nobody else holds the old description (which was unlocked as
    /// our last reference went): the file is then ours alone, locked, to remove or empty. It
    /// fails when someone does: a forked child, a duplicate handed to another process, or a
    /// copy that took the lock in that instant (then rightfully: the file is at its path). A
    /// few system calls (`statat`, `openat`, `fstat`, a `dup3` per descriptor, `fcntl`,
    /// `close`) per release. Anything failing on the way counts as shared: a file left behind
    /// is harmless, a held one removed is not.
    fn shared_with_another(&self, now: &Now) -> Option<&'static str> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
        // Looked at before it is opened: another file at the path (a FIFO, whose writer an
        // `O_RDWR` open would release) is never opened; one swapped in after the look is told
        // apart by the `fstat` below.
        match rustix::fs::statat(
            &*self.dir,
            self.file_name.as_os_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if st.st_dev == now.dev && st.st_ino == now.ino => {}
            // Another file at the path, or none: ours is not there to remove.
            Ok(_) | Err(Errno::NOENT) => return None,
            Err(_) => return Some("cannot stat the lock file to check"),
        }
        let file = match retry_eintr(|| {
            rustix::fs::openat(&*self.dir, self.file_name.as_os_str(), flags, Mode::empty())
        }) {
            Ok(file) => file,
            // Not our file at the path (gone, or a symlink now): nothing there to remove.
            Err(Errno::NOENT | Errno::LOOP) => return None,
            Err(_) => return Some("cannot open the lock file again to check"),
        };
        match rustix::fs::fstat(&file) {
            Ok(st) if st.st_dev == now.dev && st.st_ino == now.ino => {}
            // Another file at the path: ours is not there to remove.
            Ok(_) => return None,
            Err(_) => return Some("cannot fstat the lock file opened again"),
        }
        if self.files.replace(&file).is_err() {
            return Some("cannot move the lock's descriptors to the file opened again");
        }
        // A process of ours starting a program shares every descriptor from its `fork` (or
        // `clone`) to its `exec`, which closes the lock's: another thread spawning a child at
        // this moment holds the old description for that long. So a few tries, about a quarter
        // of a second in all (a loaded machine's `exec` took longer than the 60 ms there were:
        // CI), before the lock counts as held elsewhere (a forked child that lives on, a
        // duplicate handed over) and the file is left in place. Only such a release waits.
        let mut pause = Duration::from_millis(1);
        loop {
            match lock_exclusive(&file, false) {
                Ok(()) => return None,
                // Kept from us by read locks alone: no description of ours (a forked child
                // holds the write lock it shares), but someone who may read the file and took
                // a read lock in the moment it was let go. A file we keep is left as ever;
                // one of ours is removed here, under a read lock of ours, so that no copy can
                // have taken it as it goes (see `remove_unheld`): left, it would keep every
                // copy waiting on the grace first.
                Err(Errno::AGAIN | Errno::ACCESS) if is_held(&file) == Ok(false) => {
                    // A kept file is left as it is, as ever.
                    if now.keep_file {
                        return Some("kept, and read-locked by another process: left as it is");
                    }
                    return Some(
                        match rustix::fs::fstat(&file)
                            .map(|st| remove_unheld(&self.shared.plan, &self.dir, &file, &st))
                        {
                            Ok(Ok(Removal::Removed)) => "removed under a read lock of ours",
                            _ => "read-locked by another process, and not removable now",
                        },
                    );
                }
                Err(Errno::AGAIN | Errno::ACCESS) if pause <= Duration::from_millis(128) => {
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(Errno::AGAIN | Errno::ACCESS) => {
                    return Some("the lock is held through another open file description");
                }
                Err(_) => return Some("cannot lock the file opened again"),
            }
        }
    }

    /// The descriptor (for tests that check it is not inherited).
    #[allow(dead_code)]
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
}

/// The lock's descriptor, for [`crate::InstanceGuard::lock_file_descriptor`]: a duplicate of it
/// shares the open file description, and with it the lock.
impl AsFd for HeldLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // The file the lock is on now (see `Files`): the number stays, the file may change.
        self.files.lent().as_fd()
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Err(e) = self.release_in_place() {
            tracing::warn!(error = %e, "releasing lock file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockfile::attempt::{Attempt, lock};
    use crate::lockfile::dir::{open_dir, tests::private_plan};

    /// A shorter re-write (here: the bus name dropped) never leaves the file anything but one
    /// whole record, even for a moment: it is padded, not followed by a truncation, so a holder
    /// killed in between leaves a file the next copy takes over.
    #[test]
    fn a_shorter_record_rewrite_leaves_one_whole_record() {
        let base = tempfile::tempdir().expect("tempdir");
        let plan = private_plan(&base.path().join("locks"));
        let mut dir = open_dir(&plan, false).expect("dir");
        let Attempt::Acquired(mut held, None) = lock(&plan, &mut dir, false).expect("lock") else {
            panic!("a fresh file is acquired, with no previous record");
        };
        let long = LockRecord::for_self(
            vec![crate::scope::Backend::LockFile],
            None,
            Some(format!(":1.{}", "9".repeat(200))),
        );
        let short = LockRecord {
            bus_unique_name: None,
            ..long.clone()
        };
        let path = plan.dir.join(&plan.file_name);
        for record in [&long, &short] {
            held.write_record(record).expect("write");
            let content = std::fs::read(&path).expect("read");
            assert_eq!(LockRecord::parse_whole(&content).as_ref(), Some(record));
            assert_eq!(content.len(), long.to_line().len());
        }
        held.release().expect("release");
        assert!(!path.exists(), "a file we created is removed");
    }

    /// A lock file is never empty at its name while a copy sets up: made, it has a record of
    /// ours before it has its name; taken over from a crashed holder, that holder's record is
    /// replaced by ours in one write, not emptied first. So a copy killed before it wrote its own
    /// record leaves a file the next copy takes over and removes, never an empty one, which it
    /// would take for a user's and keep for good (a review: root's kept that way in the shared
    /// directory, and every other user was refused with 77 from then on).
    #[test]
    fn a_lock_file_has_a_record_of_ours_from_the_moment_it_is_taken() {
        let base = tempfile::tempdir().expect("tempdir");
        let plan = private_plan(&base.path().join("locks"));
        let path = plan.dir.join(&plan.file_name);
        let ours = |what: &str| {
            let content = std::fs::read(&path).expect("read");
            let record = LockRecord::parse_whole(&content)
                .unwrap_or_else(|| panic!("{what}: not one record: {content:?}"));
            assert_eq!(record.pid, std::process::id(), "{what}");
            assert!(!record.keep, "{what}");
        };
        let mut dir = open_dir(&plan, false).expect("dir");
        let Attempt::Acquired(held, None) = lock(&plan, &mut dir, false).expect("lock") else {
            panic!("a fresh file is acquired, with no previous record");
        };
        ours("made");
        held.release().expect("release");
        // A crashed holder's record, longer than ours: the file left as it was.
        let crashed = LockRecord {
            pid: 999_999,
            ..LockRecord::for_self(
                vec![crate::scope::Backend::LockFile],
                None,
                Some(format!(":1.{}", "9".repeat(200))),
            )
        };
        std::fs::write(&path, crashed.to_line()).expect("the crashed holder's record");
        let mut dir = open_dir(&plan, false).expect("dir");
        let Attempt::Acquired(held, Some(previous)) = lock(&plan, &mut dir, false).expect("lock")
        else {
            panic!("taken over, with the crashed holder's record");
        };
        assert_eq!(previous.pid, 999_999);
        ours("taken over");
        held.release().expect("release");
        assert!(!path.exists(), "a file of ours is removed");
    }
}
