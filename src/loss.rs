//! Losing the instance: why, and how the program hears of it.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;

use crate::runtime::block_here;

/// Why (part of) the instance was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// Another copy took the bus name (only possible when replacement was allowed).
    Replaced,
    /// The bus connection closed (the bus daemon died or dropped us).
    BusConnectionClosed,
    /// The lock file was removed by someone else, and is not re-created. A file that the watch
    /// saw removed (inotify), and nothing else made at its path since, while its directory
    /// stays, is re-created by the holder at once, locked, and nothing is lost (a warning is
    /// logged); this is reported otherwise: another copy made or locked the new file first, the
    /// directory went too, the file was removed too often (a 17th re-creation within a
    /// second: a process removing it in a loop is not a tmp cleaner), another copy made a
    /// file at the path since ours went (it came and went while this copy was stopped: another
    /// copy ran meanwhile), or the removal was found without having been seen (by the periodic
    /// re-check, without inotify, or before the watch was in place), when whether another copy
    /// came and went cannot be known. A program that gave a
    /// duplicate of the lock's descriptor to another process hears of each re-creation through
    /// [`crate::InstanceGuard::lock_file_recreations`].
    LockFileRemoved,
    /// The lock file was replaced by another file (seen by the watch or the periodic re-check).
    LockFileReplaced,
    /// The lock file's directory (or a directory above it, or above a symlink's target on the
    /// way) was removed, moved or replaced, or a symlink on the way was retargeted: our file is
    /// still in the directory we opened, but the lock path no longer leads to it, so a copy
    /// started now would lock another one. Also when the holder can no longer follow the path
    /// at all (`EACCES`: a directory on the way replaced by one it may not enter): that it
    /// leads to our file can then no longer be confirmed.
    LockDirectoryRemoved,
    /// The lock on the lock file was let go while the file stayed at its path: a process that
    /// shares the lock's open file description (`run`'s COMMAND through
    /// `UNIQUE_INSTANCE_LOCK_FD`, a forked child, a handed descriptor) unlocked it
    /// (`F_OFD_SETLK` with `F_UNLCK`), so another copy could take it. No event tells of it: the
    /// watch sees it when it wakes (the periodic re-check of
    /// [`crate::InstanceOptions::recheck_lock_file`], or any change on the path), or the
    /// release does.
    LockLetGo,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossReason::Replaced => "replaced by another instance on the bus",
            LossReason::BusConnectionClosed => "the bus connection closed",
            LossReason::LockFileRemoved => "the lock file was removed by someone else",
            LossReason::LockFileReplaced => "the lock file was replaced by someone else",
            LossReason::LockLetGo => {
                "the lock on the lock file was let go by a process that shares its descriptor"
            }
            LossReason::LockDirectoryRemoved => {
                "the lock file's directory was removed, moved or replaced by someone else"
            }
        })
    }
}

/// One loss event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Loss {
    /// What happened.
    pub reason: LossReason,
    /// True only when another backend was *re-verified at the moment of this loss* to still
    /// exclude every other copy: the program may keep running. False means another copy may
    /// now start, or that nothing could be verified: stop the guarded work.
    ///
    /// The rule, backend by backend:
    /// - The bus connection closed: true only if the lock file was checked right then and is
    ///   still ours — the path (through our directory, and walked afresh from `/`) names our
    ///   file, a fresh open of it finds it locked, with our (dev, ino) — and no earlier loss
    ///   took it or the name. Not remembered from acquisition: a lock file removed unnoticed
    ///   (the watch turned off) is found gone here.
    /// - The lock file (or its directory) was lost: always false, even while the bus name is
    ///   still ours. The name excludes only copies that reach the same bus; every copy takes the
    ///   lock file first, so a copy with no bus, or another bus, would now start.
    /// - The name was taken over ([`LossReason::Replaced`]): false.
    ///
    /// A later loss is judged afresh, so once a loss says false, so does every later one; and
    /// [`crate::InstanceGuard::is_exclusive`] is false once any loss said false.
    pub still_exclusive: bool,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.still_exclusive {
            write!(
                f,
                "{} (the lock file still excludes other copies)",
                self.reason
            )
        } else {
            write!(f, "{}; this copy is no longer the instance", self.reason)
        }
    }
}

/// Where an instance's losses are recorded: the one sender of its loss channel, shared by the
/// guard and the tasks and thread that watch its backends, which the guard takes back
/// ([`LossLog::close`]) when it is released, so that every [`LossWatcher`] then ends.
///
/// The watchers hold clones of the slot, not of the sender: a task that was aborted but not yet
/// dropped (it belongs to a current-thread runtime that does not run now; its future goes only
/// when that runtime runs again) cannot keep the channel open, and a watcher would otherwise
/// wait for ever after the guard is gone. Every loss goes through the one lock, so losses are
/// recorded in one order, and none is recorded once the log is closed.
#[derive(Debug, Clone)]
pub(crate) struct LossLog(std::sync::Arc<std::sync::Mutex<Option<watch::Sender<Vec<Loss>>>>>);

impl LossLog {
    /// An empty log, and the receiver that its watchers are made from.
    pub(crate) fn new() -> (Self, watch::Receiver<Vec<Loss>>) {
        let (tx, rx) = watch::channel(Vec::new());
        (
            LossLog(std::sync::Arc::new(std::sync::Mutex::new(Some(tx)))),
            rx,
        )
    }

    /// Modifies the log and tells its watchers, unless it is closed (the guard is gone: nothing
    /// more is lost).
    pub(crate) fn send_modify(&self, modify: impl FnOnce(&mut Vec<Loss>)) {
        if let Some(tx) = self.sender().as_ref() {
            tx.send_modify(modify);
        }
    }

    /// Modifies the log, telling its watchers only when `modify` returns true: whether it was
    /// told (false once the log is closed).
    pub(crate) fn send_if_modified(&self, modify: impl FnOnce(&mut Vec<Loss>) -> bool) -> bool {
        self.sender()
            .as_ref()
            .is_some_and(|tx| tx.send_if_modified(modify))
    }

    /// Closes the log, handing its sender to the caller: once that is dropped, every watcher
    /// ends (after the losses it has not returned yet), whoever still holds the log.
    pub(crate) fn close(&self) -> Option<watch::Sender<Vec<Loss>>> {
        self.sender().take()
    }

    fn sender(&self) -> std::sync::MutexGuard<'_, Option<watch::Sender<Vec<Loss>>>> {
        // A panic while the lock was held (in `modify`) left the log as it was or one loss
        // longer: still a log.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Follows an instance's losses independently of its guard; see
/// [`crate::InstanceGuard::loss_watcher`].
#[derive(Debug, Clone)]
pub struct LossWatcher {
    losses: watch::Receiver<Vec<Loss>>,
    seen: usize,
    read: LossesRead,
}

/// How many of an instance's losses, oldest first, the program has been given, by its guard or
/// any of its watchers: a release tells apart a loss the program heard of from one it never did
/// (see [`crate::Error::LostBeforeRelease`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct LossesRead(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl LossesRead {
    /// The first `n` losses have been given to the program.
    pub(crate) fn up_to(&self, n: usize) {
        self.0.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl LossWatcher {
    /// A watcher of `losses` that starts after the first `seen` of them, and counts what it
    /// returns in `read`.
    pub(crate) fn new(losses: watch::Receiver<Vec<Loss>>, seen: usize, read: LossesRead) -> Self {
        LossWatcher { losses, seen, read }
    }

    /// Waits for the next loss this watcher has not returned yet.
    ///
    /// Returns `None` once the guard is gone (released or dropped) and every loss was returned.
    pub async fn next(&mut self) -> Option<Loss> {
        let seen = self.seen;
        let loss = self
            .losses
            .wait_for(|log| log.len() > seen)
            .await
            .ok()
            .map(|log| log[seen]);
        if loss.is_some() {
            self.seen += 1;
            self.read.up_to(self.seen);
        }
        loss
    }

    /// Blocking form of [`LossWatcher::next`], giving up after `timeout` (`None`: no limit).
    /// It needs no runtime and works anywhere, inside a runtime too.
    ///
    /// # Caveats
    ///
    /// It blocks the calling thread: called from a task of a current-thread runtime, it also
    /// stops the tasks that would report a loss of a guard acquired with
    /// [`crate::InstanceOptions::acquire_async`] on that runtime (a guard from the blocking
    /// [`crate::InstanceOptions::acquire`] has a thread of its own). Prefer
    /// [`LossWatcher::next`] in async code.
    pub fn next_blocking(&mut self, timeout: Option<Duration>) -> Option<Loss> {
        block_here(self.next(), timeout).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher's next loss, or `None` for its end; a panic if it gives neither (it would
    /// wait for ever).
    fn next(watcher: &mut LossWatcher) -> Option<LossReason> {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), watcher.next()).await })
            .expect("the watcher neither returned a loss nor ended")
            .map(|l| l.reason)
    }

    fn loss(reason: LossReason) -> Loss {
        Loss {
            reason,
            still_exclusive: false,
        }
    }

    /// Once the guard closes the log, its watchers return what was recorded before, in order,
    /// then end, though a task still holds the log; what that task reports after is not
    /// recorded.
    #[test]
    fn a_closed_log_ends_its_watchers_after_what_it_recorded() {
        let (log, losses) = LossLog::new();
        let task = log.clone();
        let mut watcher = LossWatcher::new(losses, 0, LossesRead::default());
        task.send_modify(|l| l.push(loss(LossReason::Replaced)));
        let sender = log.close().expect("an open log");
        assert!(log.close().is_none(), "closed twice");
        sender.send_modify(|l| l.push(loss(LossReason::LockFileRemoved)));
        drop(sender);
        task.send_modify(|l| l.push(loss(LossReason::BusConnectionClosed)));
        assert!(!task.send_if_modified(|_| true));
        assert_eq!(next(&mut watcher), Some(LossReason::Replaced));
        assert_eq!(next(&mut watcher), Some(LossReason::LockFileRemoved));
        assert_eq!(next(&mut watcher), None);
    }

    /// A task reporting while the log is closed: each loss it was told was recorded is
    /// returned, none is lost, and the watcher then ends.
    #[test]
    fn losses_reported_during_the_close_are_kept_in_order() {
        for _ in 0..50 {
            let (log, losses) = LossLog::new();
            let mut watcher = LossWatcher::new(losses, 0, LossesRead::default());
            let task = log.clone();
            let reporter = std::thread::spawn(move || {
                let mut recorded = 0;
                for _ in 0..1000 {
                    if !task.send_if_modified(|l| {
                        l.push(loss(LossReason::Replaced));
                        true
                    }) {
                        break;
                    }
                    recorded += 1;
                }
                recorded
            });
            drop(log.close());
            let recorded = reporter.join().expect("reporter");
            let mut returned = 0;
            while next(&mut watcher).is_some() {
                returned += 1;
            }
            assert_eq!(returned, recorded);
        }
    }
}
