//! Waiting for a holder to let go: the first attempt, then an inotify watch on the lock
//! directory and on the file, the check that the lock may be free now, and the async wait loop
//! built on them (with its re-check intervals and the timeout).
//! Must not: block in `F_OFD_SETLKW` (nothing could cancel it); every wait can be dropped.
//!
//! Over 400 lines, by a little: the blocking and the async wait share every check of the lock
//! (and of a removed file) written here once.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::name::InstanceName;
use crate::plan::LockPlan;
use crate::test_hooks::{self, Hook};

use super::attempt::{Attempt, lock_async};
use super::dir::{LockDir, open_dir};
use super::held::HeldLock;
use super::ofd::is_held;
use super::probe::{kept_out_by_readers, peek_holder};
use super::record::LockRecord;
use super::watch::{drain, new_inotify};

/// An inotify instance (non-blocking, close-on-exec) for a copy waiting for the lock file of
/// `lock_dir`: readable when an entry of the directory is created, removed or renamed, or the
/// directory itself goes. [`may_be_free`] adds the file itself before each check.
///
/// A lock wait built on it can be abandoned at any moment (dropping the descriptor ends it),
/// unlike a thread blocked in `F_OFD_SETLKW`, which nothing can cancel and which would take the
/// lock long after its waiter gave up.
fn release_watch(lock_dir: &LockDir) -> std::io::Result<ReleaseWatch> {
    use rustix::fs::inotify::{self, WatchFlags};
    let fd = new_inotify()?;
    let dir = format!("/proc/self/fd/{}", lock_dir.fd.as_raw_fd());
    let wd = inotify::add_watch(
        &fd,
        dir.as_str(),
        WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR,
    )?;
    Ok(ReleaseWatch {
        fd,
        watches: vec![wd],
    })
}

/// A [`release_watch`]: the inotify instance and its watches.
#[derive(Debug)]
struct ReleaseWatch {
    fd: OwnedFd,
    watches: Vec<i32>,
}

impl AsRawFd for ReleaseWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl ReleaseWatch {
    fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The instance with its watches removed, to be kept rather than closed: closing an inotify
    /// instance waits for an RCU grace period (about 15 ms measured, benchmark 4), which a copy
    /// that has just taken the lock over should not spend before it starts. Kept by the guard,
    /// it is closed after the lock is released.
    fn into_quiet(self) -> OwnedFd {
        for wd in &self.watches {
            // Removing a watch defers the freeing work, unlike closing the instance.
            let _ = rustix::fs::inotify::remove_watch(&self.fd, *wd);
        }
        drain(&self.fd);
        self.fd
    }
}

/// Could the lock file of `plan` be taken now? Arms `watch` (a [`release_watch`], when there is
/// one) on the file the path names first, so that a release after this check wakes the waiter:
/// an OFD lock is released when the last descriptor of its open file description closes, which
/// inotify reports as `IN_CLOSE_WRITE` (the holder exiting, even killed, or a holder that
/// removed the file, which the directory watch reports). Tested with `F_OFD_GETLK` on a
/// descriptor opened only for reading, whose close wakes nobody; any doubt (an error, a lock
/// directory removed or replaced) says "try", unless a file waited on is still held (below):
/// the attempt itself then decides, and reports what is wrong. Not every release sends an
/// event (see [`RECHECK_EVERY`]): waiters also call this periodically.
///
/// A file found held is kept open in `waited_on` (see [`WaitedOn`]): when the path later names
/// no file, or a file nobody holds, that is not the one waited on, the answer is still "no"
/// for as long as the file waited on is held. Someone removed the lock file under its holder,
/// which re-creates it (`recover.rs`), or is releasing it (it removes its file while it still
/// holds it): a waiter that made a new file at the path then would run beside a holder that is
/// still there. It is woken again when that holder lets go (`IN_CLOSE_WRITE` on the file waited
/// on, which stays watched) or re-creates its file (`IN_CREATE` in the directory).
fn may_be_free(
    watch: Option<&mut ReleaseWatch>,
    plan: &LockPlan,
    lock_dir: &LockDir,
    seen: &mut Seen,
) -> bool {
    use rustix::fs::inotify::{self, WatchFlags};
    // Removed or replaced, or no longer where the path leads (a symlink on the way retargeted),
    // the directory's file is no longer the one to wait for: try, and the attempt opens (makes)
    // the directory the path leads to now. (Its holder cannot re-create a file there: that is a
    // loss, and the path's directory is where copies meet now.)
    if !lock_dir.is_current(plan) {
        return true;
    }
    // Looked at before it is opened: anything but a regular file is never opened (see
    // `only_regular`), and counts as no file here; the attempt then refuses it. One swapped in
    // after the look is not held, and the attempt refuses it too.
    let regular = rustix::fs::statat(
        &*lock_dir.fd,
        plan.file_name.as_os_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile);
    let file = if regular {
        rustix::fs::openat(
            &*lock_dir.fd,
            plan.file_name.as_os_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )
    } else {
        Err(Errno::NOENT)
    };
    let path_names = match file {
        Ok(file) => {
            if let Some(watch) = watch {
                // Through the descriptor, so the watch is on the very file tested below.
                let path = format!("/proc/self/fd/{}", file.as_raw_fd());
                // Without a watch on it (inotify's limits), the periodic re-check sees it let
                // go; the rules below hold either way.
                if let Ok(wd) =
                    inotify::add_watch(&watch.fd, path.as_str(), WatchFlags::CLOSE_WRITE)
                    && !watch.watches.contains(&wd)
                {
                    watch.watches.push(wd);
                }
            }
            if matches!(is_held(&file), Ok(true)) {
                *seen = Seen {
                    waited_on: WaitedOn::new(file),
                    ..Seen::default()
                };
                return false;
            }
            rustix::fs::fstat(&file)
                .ok()
                .map(|st| (st.st_dev, st.st_ino))
        }
        Err(_) => None,
    };
    // Nobody holds the path's file, or there is none: free, unless the file waited on is
    // another one and still held, or may have been followed by one we never saw.
    if let Some(old) = &seen.waited_on
        && path_names != Some(old.id)
    {
        if matches!(is_held(&old.file), Ok(true)) {
            test_hooks::stop_at(Hook::WaitingOnARemovedFile);
            return false;
        }
        // A holder that re-creates its file lets go of the removed one once the new one is
        // locked: if that new one was removed in turn before we ever found it held, the
        // holder still holds it, and is about to re-create it again. Not knowing, we wait a
        // while for that re-creation (an event) rather than make a file beside the holder.
        if seen.made_since {
            let since = *seen.unsure_since.get_or_insert_with(Instant::now);
            if since.elapsed() < UNSURE_GRACE {
                return false;
            }
        }
    }
    *seen = Seen::default();
    true
}

/// How long a waiter that may have missed a re-created lock file (see [`Seen::made_since`])
/// waits for its holder to show itself again before it goes ahead. Only that rare
/// interleaving pays it: removals in quick succession, each before the waiter looked.
const UNSURE_GRACE: Duration = Duration::from_secs(1);

/// What a waiter knows of the files it found at the path (see [`may_be_free`]).
#[derive(Debug, Default)]
struct Seen {
    /// The file last found held.
    waited_on: Option<WaitedOn>,
    /// Since `waited_on` was last found held, a file of the lock file's name was made in the
    /// directory (`IN_CREATE`, `IN_MOVED_TO`): perhaps a holder's re-created file, which we
    /// have not found held.
    made_since: bool,
    /// Since when the answer has been "not free" only because of `made_since`, counted from the
    /// latest file made (see [`Seen::made_one`]).
    unsure_since: Option<Instant>,
}

impl Seen {
    /// A file of the lock file's name was made in the directory. The grace of
    /// [`UNSURE_GRACE`] counts from the latest one: a holder whose file is removed again and
    /// again shows itself by each re-creation, and a waiter that had counted from the first
    /// went ahead while that holder still held, on a machine loaded enough that the removals
    /// took longer than the grace (suspected from one CI failure of
    /// `removal_race::waiters_woken_by_removals_leave_the_holder_its_instance`).
    fn made_one(&mut self) {
        self.made_since = true;
        self.unsure_since = None;
    }
}

/// The file a waiter last found held, kept open (for reading only, so its close wakes nobody)
/// until it is free, another file is found held at the path, or the wait ends: see
/// [`may_be_free`].
#[derive(Debug)]
struct WaitedOn {
    file: OwnedFd,
    /// Its `(st_dev, st_ino)`.
    id: (u64, u64),
}

impl WaitedOn {
    fn new(file: OwnedFd) -> Option<Self> {
        let st = rustix::fs::fstat(&file).ok()?;
        Some(WaitedOn {
            file,
            id: (st.st_dev, st.st_ino),
        })
    }
}

/// Tries the lock file once; gives back the directory too, to wait with.
pub(crate) async fn try_lock(
    plan: &LockPlan,
    allow_network_fs: bool,
) -> Result<(Attempt, LockDir)> {
    let mut dir = open_dir(plan, allow_network_fs)?;
    Ok((lock_async(plan, &mut dir).await?, dir))
}

/// Waits for the lock file held by `holder`, without a thread and without blocking: each
/// attempt is a non-blocking one, made again whenever inotify reports that the lock may have
/// been released (see [`may_be_free`]), and at least every [`RECHECK_EVERY`].
/// Dropping the future (a timeout, a `select!`) ends the wait at once, with nothing left
/// behind that could take the lock later. `timeout` is the wait asked for, which `deadline`
/// ends: the [`Error::TimedOut`] says how long that was.
pub(crate) async fn wait_lock(
    name: &InstanceName,
    plan: &LockPlan,
    mut dir: LockDir,
    holder: Box<Holder>,
    notify_ready: bool,
    deadline: Option<Instant>,
    timeout: Duration,
) -> Result<Waited> {
    tracing::info!(name = %name, holder = %holder, "waiting for the running copy to exit");
    if notify_ready {
        crate::notify::status(&format!(
            "{name}: waiting for the running copy to exit ({holder})"
        ));
    }
    let waited = wait_for_release(plan, &mut dir);
    match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline.into(), waited).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out(name, plan, timeout, Some(*holder))),
        },
        None => waited.await,
    }
}

/// What a wait for the lock file that ran out after `waited` says: timed out, naming the
/// holder as its record says now (else `holder`, the one met first); unless no copy holds the
/// file but readers keep it from us: then no running copy was waited for, and saying so would
/// name one that is not there (a review: "timed out waiting for the running copy", while
/// `status` said it was not running). That is the refusal a copy that does not wait gets.
pub(crate) fn timed_out(
    name: &InstanceName,
    plan: &LockPlan,
    waited: Duration,
    holder: Option<Holder>,
) -> Error {
    let path = plan.path();
    if kept_out_by_readers(&path) {
        return super::open::read_locked(plan, &path);
    }
    Error::TimedOut {
        name: name.to_string(),
        waited,
        holder: Box::new(
            peek_holder(&path)
                .or(holder)
                .unwrap_or_else(|| super::reader::unknown_holder(&path)),
        ),
    }
}

/// How long after a wake-up that found the lock still held it is checked again, doubling up to
/// [`RECHECK_EVERY`]. The kernel queues a closing holder's `IN_CLOSE_WRITE` just *before* it
/// releases the lock (`__fput`: `fsnotify_close`, then `locks_remove_file`), so a waiter that
/// runs at once can still find it held, and no later event would come: a few quick re-checks
/// close that window.
const RECHECK_FIRST: Duration = Duration::from_millis(1);
/// Before those, a few re-checks at once, yielding in between: the window is usually
/// microseconds, shorter than a timer's millisecond (the take-over benchmark gains it).
const QUICK_RECHECKS: u32 = 20;
/// The safety net under the events: however the lock is let go, a waiter tries again at least
/// this often. Some releases send no event at all: a lock dropped with `F_UNLCK` by a holder
/// that keeps its descriptor open, a shared lock held through a descriptor open only for
/// reading (whose close is `IN_CLOSE_NOWRITE`), a file system that does not report closes. A
/// re-check is a few system calls (`stat`, `open`, `F_OFD_GETLK`): nothing, once a second.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// The re-check interval when inotify cannot be used at all (its limits reached).
const RECHECK_WITHOUT_INOTIFY: Duration = Duration::from_millis(100);

/// What a wait gives: the lock, its previous holder's record, and the wait's inotify instance,
/// quiet, to be kept (see [`ReleaseWatch::into_quiet`]).
type Waited = (HeldLock, Option<LockRecord>, Option<std::os::fd::OwnedFd>);

/// A [`release_watch`] on `dir`, registered with the runtime; `None` (logged) when
/// inotify cannot be used.
fn watch_release(plan: &LockPlan, dir: &LockDir) -> Option<tokio::io::unix::AsyncFd<ReleaseWatch>> {
    // `AsyncFd::new` is deprecated because a `T` could close its descriptor behind tokio's back;
    // a `ReleaseWatch` moved in here cannot (see `watch_lock`).
    #[allow(deprecated)]
    match release_watch(dir).and_then(tokio::io::unix::AsyncFd::new) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(path = %plan.path().display(), error = %e,
                "cannot watch the lock file with inotify; trying it every 100 ms instead");
            None
        }
    }
}

/// Waits in `dir` for the lock file of `plan`; when the directory is removed or replaced
/// meanwhile, goes on waiting in the one the path leads to then (the attempt opens or makes it
/// and replaces `dir`, and the watch follows).
async fn wait_for_release(plan: &LockPlan, dir: &mut LockDir) -> Result<Waited> {
    let mut watch = watch_release(plan, dir);
    let mut watched = dir.id();
    let mut recheck = RECHECK_EVERY;
    let mut quick = 0;
    let mut seen = Seen::default();
    let name = plan.file_name.as_os_str();
    loop {
        let watching = watch.as_mut().map(|watch| {
            // Events up to here are answered by the check below.
            if take_events(watch.get_ref().fd(), name) == Some(true) {
                seen.made_one();
            }
            watch.get_mut()
        });
        if may_be_free(watching, plan, dir, &mut seen) {
            match lock_async(plan, dir).await? {
                Attempt::Acquired(mut held, previous) => {
                    let quiet = watch.map(|w| w.into_inner().into_quiet());
                    if let Some(quiet) = &quiet {
                        // Released after the lock when this process dies, as with the watch of
                        // `watch_lock_file` (see `HeldLock::move_above`).
                        held.move_above(quiet)?;
                    }
                    return Ok((held, previous, quiet));
                }
                // Another copy was quicker: wait for it in turn.
                Attempt::Busy(_) => {}
                // A reader keeps the file from every copy for now: wait for it to let go, which
                // no event tells, so by the timer, backing off. The attempt opened the file for
                // writing, and its close queued an `IN_CLOSE_WRITE` that is no news: read now,
                // or every attempt would wake the next at once (a review: attempts back to back
                // for as long as the reader stayed, a busy loop where the grace's thread could
                // not be had).
                Attempt::KeptOut => {
                    if let Some(watch) = &watch
                        && take_events(watch.get_ref().fd(), name) == Some(true)
                    {
                        seen.made_one();
                    }
                    quick = 0;
                }
            }
        }
        if dir.id() != watched {
            // The attempt found the directory removed or replaced and opened the new one: the
            // old watch would wait on a directory nobody uses any more. The file waited on
            // was in the old one: its holder cannot re-create it where copies meet now.
            watch = watch_release(plan, dir);
            watched = dir.id();
            seen = Seen::default();
            recheck = RECHECK_FIRST;
            continue;
        }
        let Some(watch) = &watch else {
            tokio::time::sleep(RECHECK_WITHOUT_INOTIFY).await;
            continue;
        };
        if quick > 0 {
            quick -= 1;
            tokio::task::yield_now().await;
            continue;
        }
        let mut made = false;
        let event = async {
            loop {
                let Ok(mut ready) = watch.readable().await else {
                    // Cannot happen with a registered descriptor; re-check rather than spin.
                    return std::future::pending::<()>().await;
                };
                let got = take_events(ready.get_inner().fd(), name);
                ready.clear_ready();
                if let Some(made_one) = got {
                    made = made_one;
                    return;
                }
            }
        };
        test_hooks::stop_at(Hook::InLockWait);
        tokio::select! {
            () = event => {
                recheck = RECHECK_FIRST;
                quick = QUICK_RECHECKS;
            }
            () = tokio::time::sleep(recheck) => {
                recheck = (recheck * 2).min(RECHECK_EVERY);
            }
        }
        if made {
            seen.made_one();
        }
    }
}

/// Reads everything queued on a [`release_watch`]: `None` when there was nothing, else whether
/// an entry named `name` was made in the directory (`IN_CREATE`, `IN_MOVED_TO`).
fn take_events(fd: &OwnedFd, name: &std::ffi::OsStr) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    /// `struct inotify_event` before its name: `wd`, `mask`, `cookie`, `len`.
    const HEADER: usize = 16;
    use rustix::fs::inotify::WatchFlags;
    let made_mask = (WatchFlags::CREATE | WatchFlags::MOVED_TO).bits();
    let mut buf = [0u8; 4096];
    let mut any = None;
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        let made = any.get_or_insert(false);
        let mut at = 0;
        while let Some(header) = buf.get(at..at + HEADER).filter(|_| at + HEADER <= n) {
            let word = |i: usize| {
                header
                    .get(i..i + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, u32::from_ne_bytes)
            };
            let (mask, len) = (word(4), word(12) as usize);
            let entry = buf.get(at + HEADER..at + HEADER + len).unwrap_or_default();
            let entry = entry.split(|&b| b == 0).next().unwrap_or_default();
            if mask & made_mask != 0 && entry == name.as_bytes() {
                *made = true;
            }
            at += HEADER + len;
        }
    }
    any
}
