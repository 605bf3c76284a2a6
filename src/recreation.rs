//! A lock file removed and re-created by its holder: not a loss, but news for a program that
//! gave a duplicate of the lock's descriptor to another process.

use std::time::Duration;

use tokio::sync::watch;

use crate::runtime::block_here;

/// Tells a program each time its lock file was re-created after someone removed it; see
/// [`InstanceGuard::lock_file_recreations`](crate::InstanceGuard::lock_file_recreations).
///
/// When someone removes the lock file (an administrator cleaning `/run/lock`, a tmp cleaner)
/// while its directory stays, the guard creates it again at once, locks it and goes on holding
/// the instance: nothing is lost (see [`LossReason::LockFileRemoved`](crate::LossReason) for
/// when it is). From then on
/// [`InstanceGuard::lock_file_descriptor`](crate::InstanceGuard::lock_file_descriptor) — the same
/// descriptor number — refers to the new file. A duplicate made before still refers to the
/// removed file, which keeps no other copy out: whoever holds one needs a new duplicate, and
/// this says when.
#[derive(Debug, Clone)]
pub struct LockFileRecreations {
    recreations: watch::Receiver<u64>,
}

impl LockFileRecreations {
    /// A watcher of `recreations` (the count so far, changed after each), from now on.
    pub(crate) fn new(mut recreations: watch::Receiver<u64>) -> Self {
        recreations.mark_unchanged();
        LockFileRecreations { recreations }
    }

    /// One that never reports anything: a guard without a lock file.
    pub(crate) fn none() -> Self {
        let (_, recreations) = watch::channel(0);
        LockFileRecreations { recreations }
    }

    /// Waits until the lock file was re-created since this watcher was made or last returned,
    /// and returns how many times it was re-created in all while the guard held it. Several
    /// re-creations before this is called are returned as one, with the count of all of them:
    /// the descriptor refers to the newest file in any case.
    ///
    /// Returns `None` once the lock file is released (the guard released or dropped), or at once
    /// when the guard holds no lock file.
    pub async fn next(&mut self) -> Option<u64> {
        self.recreations.changed().await.ok()?;
        Some(*self.recreations.borrow_and_update())
    }

    /// Blocking form of [`LockFileRecreations::next`], giving up after `timeout` (`None`: no
    /// limit). It needs no runtime and works anywhere, inside a runtime too.
    ///
    /// # Caveats
    ///
    /// As [`crate::LossWatcher::next_blocking`]: it blocks the calling thread. Prefer
    /// [`LockFileRecreations::next`] in async code.
    pub fn next_blocking(&mut self, timeout: Option<Duration>) -> Option<u64> {
        block_here(self.next(), timeout).flatten()
    }
}
