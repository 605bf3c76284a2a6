//! One attempt at the lock: open the file, lock it, check that the path still names it and that
//! its directory is still the path's, and hand back the held lock or the holder.
//! Must not: wait for a holder to go (that is `wait.rs`), nor watch a held lock (`watch.rs`).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::fs::AtFlags;
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::holder::Holder;
use crate::plan::LockPlan;
use crate::test_hooks::{self, Hook};

use super::dir::{LockDir, MAX_DIR_RACES, not_permitted};
use super::grace::{await_answer, await_answer_async, on_a_thread};
use super::held::HeldLock;
use super::ofd::{is_held, is_locked_at_all, lock_exclusive, retry_eintr, wait_unlocked};
use super::open::{
    Opened, ReadOnlyBecause, Removal, is_ours, not_a_lock_file, open_lock_file, remove_unheld,
    still_names,
};
use super::reader::{read_holder, read_holder_async};
use super::record::{LockRecord, placeholder, read_content, takeover_line, write_or_unknown};

/// The outcome of one attempt.
// Returned once per attempt and taken apart at once: boxing the large variant would only add an
// allocation to the acquire path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Attempt {
    /// Locked; carries the previous holder's record, if the file had one (a crashed holder's).
    Acquired(HeldLock, Option<LockRecord>),
    /// Someone else holds it.
    Busy(Box<Holder>),
    /// No copy holds it, but another process keeps it read-locked, so no copy can lock it, and
    /// it cannot be removed now (a user's own file, or removal kept out: see
    /// `remove_squatted`). A copy that waits goes on waiting; one that does not is refused,
    /// saying so ([`read_locked`]), not told "already running".
    KeptOut,
}

/// How many times the file may vanish or appear between our own two system calls before we
/// give up: only a process churning the directory on purpose gets anywhere near it.
const MAX_OPEN_RACES: u32 = 1000;

/// How long an unheld lock file of another user's, which this user may not write, is given to
/// be held again or removed before it is refused (see [`settles_within`]): a release's own
/// re-lock takes microseconds, and it gives up after about a quarter of a second.
const RELEASE_GRACE: Duration = Duration::from_millis(300);

/// How many times one attempt gives another user's unheld file [`RELEASE_GRACE`], at most: a
/// file let go and held again that often is being churned on purpose.
const MAX_UNSETTLED: u32 = 100;

/// What a file found unheld (or held only for reading) is given [`RELEASE_GRACE`] to do.
#[derive(Debug, Clone, Copy)]
enum Settled {
    /// Be held again (another user's file, which we may not write, let go for a moment by its
    /// holder's release).
    WhenHeld,
    /// Be held again, or let go by every reader (a waiter's read lock lasts a moment).
    WhenHeldOrUnlocked,
}

impl Settled {
    fn now(self, file: &OwnedFd) -> bool {
        is_held(file) == Ok(true)
            || matches!(self, Settled::WhenHeldOrUnlocked) && is_locked_at_all(file) == Ok(false)
    }
}

/// Whether, within `grace`, the unheld file `st` (open as `file`) settles as `settled` says, or
/// the path stops naming it. Polled: a few looks in the usual case, where its holder is between
/// the two steps of its release. Returns `false` at once when `cancel` (an eventfd) becomes
/// readable.
fn settles_within(
    file: &OwnedFd,
    dir: &OwnedFd,
    file_name: &std::ffi::OsStr,
    st: &rustix::fs::Stat,
    (grace, settled): (Duration, Settled),
    cancel: Option<&OwnedFd>,
) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + grace;
    let mut pause = Duration::from_micros(100);
    loop {
        let look = rustix::fs::statat(dir, file_name, AtFlags::SYMLINK_NOFOLLOW);
        if !still_names(look, st) || settled.now(file) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let pause_now = pause.min(deadline - now);
        match cancel {
            Some(cancel) => {
                let mut fds = [PollFd::new(cancel, PollFlags::IN)];
                let ts = Timespec {
                    tv_sec: 0,
                    tv_nsec: i64::from(pause_now.subsec_nanos()),
                };
                if let Ok(n) = rustix::event::poll(&mut fds, Some(&ts))
                    && n > 0
                {
                    return false;
                }
            }
            None => std::thread::sleep(pause_now),
        }
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// [`settles_within`] for async code, in any runtime: on a thread of its own, which dropping
/// the future ends at once (see [`on_a_thread`]). `false` when that thread cannot be had.
async fn settles_within_async(
    file: &OwnedFd,
    dir: &OwnedFd,
    file_name: &std::ffi::OsStr,
    st: &rustix::fs::Stat,
    grace: (Duration, Settled),
) -> bool {
    let (Ok(file), Ok(dir)) = (file.try_clone(), dir.try_clone()) else {
        return false;
    };
    let (file_name, st) = (file_name.to_owned(), *st);
    on_a_thread(move |cancel| settles_within(&file, &dir, &file_name, &st, grace, Some(cancel)))
        .await
        .unwrap_or(false)
}

/// Tries once (or, with `block`, waits) to lock the file of `plan` in `dir`.
///
/// Refused, it reads the holder's record with [`read_holder`]'s grace, which blocks for up to
/// [`RECORD_GRACE`](super::reader::RECORD_GRACE): from async code use [`lock_async`]. So does
/// a lock file nobody holds with a second name, for up to [`LINK_GRACE`] (see [`LinkGrace`]).
///
/// A lock directory removed or replaced under the attempt is opened (made) again, and
/// `lock_dir` then is the new one: see [`settle`].
pub(crate) fn lock(plan: &LockPlan, lock_dir: &mut LockDir, block: bool) -> Result<Attempt> {
    let mut linked = LinkGrace::default();
    let mut unsettled = 0;
    let mut squatted = None;
    loop {
        return Ok(match settle(plan, lock_dir, block, squatted.take())? {
            Step::Acquired(held, previous) => Attempt::Acquired(held, previous),
            Step::Busy(file) => Attempt::Busy(Box::new(read_holder(&file, &plan.path()))),
            Step::KeptOut => Attempt::KeptOut,
            Step::Linked(file, links) => {
                if let Some((inotify, deadline)) = linked.next(plan, links)? {
                    await_answer(&inotify, None, deadline, || one_name(&file));
                }
                continue;
            }
            Step::Unsettled(file, st) => {
                unsettled += 1;
                let dir = &lock_dir.fd;
                let grace = (RELEASE_GRACE, Settled::WhenHeld);
                if unsettled <= MAX_UNSETTLED
                    && settles_within(&file, dir, &plan.file_name, &st, grace, None)
                {
                    continue;
                }
                return Err(may_not_write(plan, &st));
            }
            Step::ReadLocked(file, st) => {
                unsettled += 1;
                let dir = &lock_dir.fd;
                let grace = (RELEASE_GRACE, Settled::WhenHeldOrUnlocked);
                if unsettled > MAX_UNSETTLED
                    || !settles_within(&file, dir, &plan.file_name, &st, grace, None)
                {
                    squatted = Some((st.st_dev, st.st_ino));
                }
                continue;
            }
        });
    }
}

/// Tries once to lock the file of `plan` in `dir`, without blocking the executor: every system
/// call it makes returns at once, and the grace a just-started holder gets to write its record
/// is awaited ([`read_holder_async`]), as is the one a second name of the file gets to go.
/// As [`lock`], it may replace `lock_dir`.
pub(super) async fn lock_async(plan: &LockPlan, lock_dir: &mut LockDir) -> Result<Attempt> {
    let mut linked = LinkGrace::default();
    let mut unsettled = 0;
    let mut squatted = None;
    loop {
        return Ok(match settle(plan, lock_dir, false, squatted.take())? {
            Step::Acquired(held, previous) => Attempt::Acquired(held, previous),
            Step::Busy(file) => {
                Attempt::Busy(Box::new(read_holder_async(&file, &plan.path()).await))
            }
            Step::KeptOut => Attempt::KeptOut,
            Step::Linked(file, links) => {
                if let Some((inotify, deadline)) = linked.next(plan, links)? {
                    await_answer_async(inotify, deadline, move || one_name(&file)).await;
                }
                continue;
            }
            Step::Unsettled(file, st) => {
                unsettled += 1;
                let dir = &lock_dir.fd;
                let grace = (RELEASE_GRACE, Settled::WhenHeld);
                if unsettled <= MAX_UNSETTLED
                    && settles_within_async(&file, dir, &plan.file_name, &st, grace).await
                {
                    continue;
                }
                return Err(may_not_write(plan, &st));
            }
            Step::ReadLocked(file, st) => {
                unsettled += 1;
                let dir = &lock_dir.fd;
                let grace = (RELEASE_GRACE, Settled::WhenHeldOrUnlocked);
                if unsettled > MAX_UNSETTLED
                    || !settles_within_async(&file, dir, &plan.file_name, &st, grace).await
                {
                    squatted = Some((st.st_dev, st.st_ino));
                }
                continue;
            }
        });
    }
}

/// How long an attempt gives a second name (a hard link) of a lock file nobody holds to go away
/// before it refuses the file as unsafe ([`UnsafeLockPath::HardLinked`]). A backup tool or a
/// hand-made `ln` may link it for a moment; a second name that stays may be another file in
/// disguise, which is never written. (A held file is never waited for: naming its holder only
/// reads it, so it is "already running" whatever its names.)
const LINK_GRACE: Duration = Duration::from_millis(500);
/// How many times an attempt looks again meanwhile, at most.
const MAX_LINK_RETRIES: u32 = 100;

/// The grace one attempt gives a second name of its lock file: see [`LINK_GRACE`].
#[derive(Default)]
struct LinkGrace {
    deadline: Option<Instant>,
    retries: u32,
}

impl LinkGrace {
    /// The attempt found the lock file with `links` names, held by nobody: what to wait with
    /// (an inotify instance that wakes when the file's names change; `None`: look again at
    /// once) and until when, or the error once the grace is over.
    fn next(&mut self, plan: &LockPlan, links: u64) -> Result<Option<(OwnedFd, Instant)>> {
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + LINK_GRACE);
        self.retries += 1;
        if self.retries > MAX_LINK_RETRIES || Instant::now() >= deadline {
            return Err(Error::UnsafeLockPath {
                path: plan.path(),
                problem: UnsafeLockPath::HardLinked { links },
            });
        }
        tracing::debug!(path = %plan.path().display(), links,
            "the lock file has more than one name and nobody holds it; waiting for that to change");
        let watch = || -> rustix::io::Result<OwnedFd> {
            use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
            let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
            // A name added or removed changes the link count: `IN_ATTRIB`.
            let flags = WatchFlags::ATTRIB | WatchFlags::DELETE_SELF | WatchFlags::DONT_FOLLOW;
            inotify::add_watch(&fd, plan.path(), flags)?;
            Ok(fd)
        };
        test_hooks::stop_at(Hook::OnASecondName);
        // No watch (the file is gone from the path, inotify's limits): the next attempt says.
        Ok(watch().ok().map(|fd| (fd, deadline)))
    }
}

/// Removes a lock file of ours, `file` (`st`), that no copy holds and someone keeps
/// read-locked past the grace (see [`remove_unheld`]), so that the attempt makes a new one:
/// `None` then, to look again. Only a lock file a copy of ours made and would remove (its
/// record says so): one kept (a user's own file given as the lock file, found empty) is never
/// removed, and neither it nor one that cannot be removed now is taken for a running copy: the
/// copy is refused saying what keeps it out.
fn remove_squatted(
    plan: &LockPlan,
    lock_dir: &LockDir,
    file: OwnedFd,
    st: &rustix::fs::Stat,
) -> Result<Option<Step>> {
    let path = plan.path();
    let content =
        read_content(&file).map_err(|e| Error::io("cannot read the lock file", &path, e.into()))?;
    let ours_to_remove = is_ours(&content)
        && match LockRecord::parse_whole(&content) {
            Some(record) => !record.keep,
            None => !empty_may_be_users(plan, st),
        };
    if !ours_to_remove {
        return Ok(Some(Step::KeptOut));
    }
    test_hooks::stop_at(Hook::BeforeRemovingSquatted);
    match remove_unheld(plan, &lock_dir.fd, &file, st) {
        Ok(Removal::Removed) => {
            tracing::warn!(path = %path.display(),
                "the lock file, held by no copy, was kept read-locked by another process; \
                 removed it to make a new one");
            Ok(None)
        }
        Ok(Removal::Moved) => Ok(None),
        Ok(Removal::Held) => Ok(Some(Step::Busy(file))),
        Ok(Removal::Contended) => Ok(Some(Step::KeptOut)),
        Err(e) => Err(Error::io("cannot remove lock file", &path, e.into())),
    }
}

/// Whether an empty file `st` at the lock path may be a user's own, kept as it is (used, never
/// written into nor removed): one given by its path (`--lock-file`), or another user's where
/// anyone else may write. At the name a copy derives in a lock directory, this user's (or, in
/// a service's own directory, which only root and the service's user may write, anyone's) is
/// a holder's that died before its first record (one made at its name) or found no room for
/// it: a lock file of ours, given a record and removed like any other. Kept, it made every
/// copy refused from then on say "holder unknown", and one read-locked by another user kept
/// the service out for good (a review). (Root meeting another user's unheld file in a shared
/// sticky directory removes it all the same, empty or not: see `open::root_must_not_keep`.)
fn empty_may_be_users(plan: &LockPlan, st: &rustix::fs::Stat) -> bool {
    plan.file_given() || (!plan.service_dir && st.st_uid != rustix::process::geteuid().as_raw())
}

/// The refusal of another user's lock file `st`, which this user may not write, that nobody
/// holds.
fn may_not_write(plan: &LockPlan, st: &rustix::fs::Stat) -> Error {
    not_permitted(
        plan,
        format!(
            "lock file {} belongs to uid {} and this user may not write it, so this user cannot \
             hold the instance through it (no copy holds it now): run as its owner (or root), or \
             have them remove it",
            plan.path().display(),
            st.st_uid
        ),
        Errno::ACCESS,
    )
}

/// Has `file` one name at most now? (The attempt then looks again.)
fn one_name(file: &OwnedFd) -> Option<()> {
    rustix::fs::fstat(file)
        .map_or(true, |st| st.st_nlink <= 1)
        .then_some(())
}

/// One attempt ([`lock_step`]) that ends in the lock directory the path leads to *now*: when
/// the directory was removed (its files with it) or replaced, or a symlink on the way was
/// retargeted, while we opened, locked or were refused the file, the lock taken or the holder seen belongs to a directory nobody else will
/// find any more, so it starts over from the directory, made again under the same rules (see
/// [`open_dir`](super::dir::open_dir)), a bounded number of times.
///
/// `squatted`: the file (device, inode) found held only by readers through a whole grace: if it
/// still is, it is removed for a new one (see [`remove_squatted`]).
fn settle(
    plan: &LockPlan,
    lock_dir: &mut LockDir,
    block: bool,
    squatted: Option<(u64, u64)>,
) -> Result<Step> {
    test_hooks::stop_at(Hook::BeforeLockFile);
    for _ in 0..MAX_DIR_RACES {
        match lock_step(plan, lock_dir, block, squatted)? {
            // Held or refused in a directory that is still the path's: the answer.
            Some(step) if lock_dir.is_current(plan) => return Ok(step),
            // Dropped unused: a lock taken in a removed directory releases nothing anyone
            // needs (a file we made in a directory renamed away is removed by the drop).
            _ => lock_dir.reopen(plan)?,
        }
    }
    Err(Error::io(
        "the lock directory keeps being removed or replaced under us at",
        &plan.dir,
        std::io::Error::from(std::io::ErrorKind::Interrupted),
    ))
}

/// An attempt, before the holder's record is read.
// Returned once per attempt and taken apart at once, as `Attempt` is.
#[allow(clippy::large_enum_variant)]
enum Step {
    Acquired(HeldLock, Option<LockRecord>),
    /// Held by someone else: the file, to read the holder's record from.
    Busy(OwnedFd),
    /// Held by nobody, with this many names: see [`LinkGrace`].
    Linked(OwnedFd, u64),
    /// Another user's file, which we may not write, held by nobody: given [`RELEASE_GRACE`] to
    /// be held again or go before it is refused (see [`settles_within`]).
    Unsettled(OwnedFd, rustix::fs::Stat),
    /// A file of ours that no copy holds, but that someone holds read-locked, so that it cannot
    /// be locked: given [`RELEASE_GRACE`] (a waiter's read lock lasts a moment), then removed
    /// (see [`remove_squatted`]).
    ReadLocked(OwnedFd, rustix::fs::Stat),
    /// See [`Attempt::KeptOut`].
    KeptOut,
}

/// Is `file` (at `st`), whose content was read unlocked and found not to be a lock file's, and
/// which nobody holds now, still that file at the path and still not a lock file's? Read
/// unlocked, the content may have been torn: a holder's record being rewritten (a longer one
/// over its first, the file's size not yet updated: a review saw a false "not a lock file"
/// under churn, about once in 250 000 acquisitions). That holder has let go since: its file
/// went with its release (no name left), or reads whole now. Anything that cannot be checked
/// counts as still not a lock file: the refusal stands.
fn read_whole_again(dir: &OwnedFd, plan: &LockPlan, file: &OwnedFd, st: &rustix::fs::Stat) -> bool {
    let gone = rustix::fs::fstat(file).is_ok_and(|now| now.st_nlink == 0)
        || !still_names(
            rustix::fs::statat(dir, plan.file_name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW),
            st,
        );
    if gone {
        return false;
    }
    read_content(file).map_or(true, |content| !is_ours(&content))
}

/// One attempt in `lock_dir`; `None` when the directory was removed under it.
fn lock_step(
    plan: &LockPlan,
    lock_dir: &LockDir,
    block: bool,
    squatted: Option<(u64, u64)>,
) -> Result<Option<Step>> {
    let euid = rustix::process::geteuid().as_raw();
    let path = plan.path();
    let dir = &lock_dir.fd;
    let mut races = 0;
    loop {
        races += 1;
        if races > MAX_OPEN_RACES {
            return Err(Error::io(
                "the lock file keeps being removed and created under us at",
                &path,
                std::io::Error::from(std::io::ErrorKind::Interrupted),
            ));
        }
        let opened = match open_lock_file(plan, dir, &path, euid, lock_dir, block) {
            Ok(Some(opened)) => opened,
            // The file vanished or appeared between two of our calls (retry), or the whole
            // directory went: nothing can be created in a removed directory (`ENOENT`).
            Ok(None) | Err(_) if lock_dir.removed() => return Ok(None),
            Ok(None) => continue,
            Err(e) => return Err(e),
        };
        let no_locks = || Error::NoUsableBackend {
            name: plan.instance.clone(),
            reason: format!(
                "the file system of {} does not support locks",
                path.display()
            ),
            source: Some(Box::new(std::io::Error::from(Errno::NOLCK))),
        };
        let (file, st, created) = match opened {
            (Opened::Writable(file, created), st) => (file, st, created),
            (Opened::Linked(file, links), _) => return Ok(Some(Step::Linked(file, links))),
            (Opened::ReadOnly(file, why), st) => {
                // A file we may only read (another user's), or must only read (not a lock file
                // of ours): we can tell who holds it, but we can never be the instance through
                // it (we could neither lock it for writing, nor record ourselves in it, nor
                // remove it).
                let held = match why {
                    ReadOnlyBecause::Held => Ok(true),
                    _ => is_held(&file),
                };
                match held {
                    Ok(true) if !block => {
                        return Ok(Some(Step::Busy(file)));
                    }
                    Ok(true) => {
                        // Its holder removes it when it lets go; then we can make our own. So
                        // wait for that with a shared lock, dropped (with `file`) at once.
                        match wait_unlocked(&file) {
                            Ok(()) => continue,
                            Err(Errno::NOLCK) => return Err(no_locks()),
                            Err(e) => return Err(Error::io("cannot wait for", &path, e.into())),
                        }
                    }
                    // Another user's file we may not write, found unheld: most often one being
                    // let go this instant. A holder locks its file afresh on release (a new open
                    // file description, to tell a forked child's hold from its own: see
                    // `HeldLock::shared_with_another`) and then removes it, so for a moment it is
                    // named, with its record, and unlocked. Given a short grace to be held again
                    // or go (a copy churning next to us); then this is a race to retry, not a
                    // refusal. A file nobody takes or removes within it is refused as before.
                    Ok(false) if why == ReadOnlyBecause::NoWritePermission => {
                        return Ok(Some(Step::Unsettled(file, st)));
                    }
                    Ok(false)
                        if why == ReadOnlyBecause::NotOurs
                            && !read_whole_again(dir, plan, &file, &st) =>
                    {
                        continue;
                    }
                    Ok(false) => {}
                    Err(Errno::NOLCK) => return Err(no_locks()),
                    Err(e) => return Err(Error::io("cannot test the lock on", &path, e.into())),
                }
                return Err(match why {
                    ReadOnlyBecause::NotOurs => not_a_lock_file(plan, &path),
                    ReadOnlyBecause::NoWritePermission | ReadOnlyBecause::Held => {
                        may_not_write(plan, &st)
                    }
                });
            }
        };
        match lock_exclusive(&file, block) {
            Ok(()) => {}
            // Refused by read locks alone: no copy holds it (see `is_held`).
            Err(Errno::AGAIN | Errno::ACCESS) if is_held(&file) == Ok(false) => {
                if squatted != Some((st.st_dev, st.st_ino)) {
                    return Ok(Some(Step::ReadLocked(file, st)));
                }
                match remove_squatted(plan, lock_dir, file, &st)? {
                    Some(step) => return Ok(Some(step)),
                    None => continue,
                }
            }
            Err(Errno::AGAIN | Errno::ACCESS) => {
                return Ok(Some(Step::Busy(file)));
            }
            Err(Errno::NOLCK) => return Err(no_locks()),
            Err(e) => return Err(Error::io("cannot lock", &path, e.into())),
        }
        // `st` is the open file's, from before the lock: the descriptor still names that inode.
        // The holder before us may have removed the file while we waited on the old inode, or
        // someone replaced it: then the lock we hold protects nothing. Start again.
        match rustix::fs::statat(dir, plan.file_name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
            Ok(_) | Err(Errno::NOENT) => {
                tracing::debug!(path = %path.display(), "lock file was replaced while we locked it; retrying");
                continue;
            }
            Err(e) => return Err(Error::io("cannot stat", &path, e.into())),
        }
        let content = read_content(&file)
            .map_err(|e| Error::io("cannot read the lock file", &path, e.into()))?;
        // Checked before it was opened for writing, and again now that nobody else can be
        // writing a record into it: data written in meanwhile is not ours to truncate. (`file`
        // is dropped unused: unlocked, never removed.)
        if !is_ours(&content) {
            return Err(not_a_lock_file(plan, &path));
        }
        // Created by us, or a crashed holder's that was ours: ours to remove. Found empty where
        // it may be a user's own (see `empty_may_be_users`), or a crashed holder's record says
        // the file was found so (`LockRecord::keep`): kept. A mark in a file
        // this attempt created is not believed: it was made with our first record, so whoever
        // wrote into it meanwhile could only make a file of ours stay behind, which keeps
        // nobody out of the lock and never lets two copies in.
        let previous = if created {
            None
        } else {
            LockRecord::parse_whole(&content)
        };
        let keep_file = !created
            && ((content.is_empty() && empty_may_be_users(plan, &st))
                || previous.as_ref().is_some_and(|r| r.keep));
        // A crashed holder's record replaced at once, in one write, so nobody reports a dead PID
        // while we set up, and a copy killed now leaves a record of its own, never an empty
        // file (see `placeholder`); one in a kept file (earlier versions wrote them) goes, and
        // the file is as its owner left it. A file we made has ours already; an empty one (the
        // usual case: someone else's) gets nothing.
        if let Some(previous) = previous.as_ref().filter(|_| !content.is_empty()) {
            let line = takeover_line(previous, content.len());
            if line.is_empty() {
                retry_eintr(|| rustix::fs::ftruncate(&file, 0)).map_err(|e| {
                    Error::io(
                        "cannot empty the crashed holder's record in",
                        &path,
                        e.into(),
                    )
                })?;
            } else {
                write_or_unknown(&file, &line, &path)
                    .map_err(|e| Error::io("cannot write holder record to", &path, e))?;
            }
        } else if content.is_empty() && !keep_file {
            // Made at its name (where it could not be named by a rename), by us or by a holder
            // that died before writing: its first record now that it is ours.
            write_or_unknown(&file, &placeholder(0), &path)
                .map_err(|e| Error::io("cannot write holder record to", &path, e))?;
        }
        let held = HeldLock::new(file, &st, keep_file, plan, lock_dir, path);
        return Ok(Some(Step::Acquired(held, previous)));
    }
}
