//! The lock file as one held part of an instance ([`HeldFile`]): the held lock, the record
//! written in it, and what watches it, released together, in that order.
//! Must not: know the other backends beyond what the record says of them.

use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::error::Result;
use crate::loss::LossLog;
use crate::scope::{Backend, BusKind};

use super::held::HeldLock;
use super::record::{LockRecord, write_or_unknown};
use super::watch::WatchHandle;
use super::watcher::LockWatchThread;

/// The lock file an instance holds. Its fields drop in order: the guard's share of the watch's
/// inotify instance goes before the watch stops, so that the watch's thread, not the release,
/// closes it (closing one takes milliseconds; only a thread that ended first, after a loss,
/// leaves the close to the release); the watch stops before the lock file is removed
/// (so that our own removal is not reported as a loss), and the inotify instance a wait used is
/// closed after the lock (see `ReleaseWatch::into_quiet`).
pub(crate) struct HeldFile {
    /// The watch's inotify instance, shared with its thread once it started, and lent for
    /// hand-over (see [`HeldFile::watch_instance`]): never read here. `None` before the watch
    /// starts, with the watch off, or when the acquisition could not watch our directory.
    lent_watch: Option<std::sync::Arc<OwnedFd>>,
    /// The lock-file watch: a thread of its own, whatever runtime acquired (see
    /// [`LockWatchThread`]); `None` with neither the watch nor a re-check.
    watch: Option<LockWatchThread>,
    lock: HeldLock,
    /// The inotify instance a wait for the lock file used, with no watches left.
    wait_watch: Option<OwnedFd>,
    /// What the file says of us, completed as other backends are held.
    record: LockRecord,
    /// The inotify instance for the watch, made before the lock (see
    /// [`HeldLock::move_above`]); taken when the watch starts. `None` when the watch is off.
    inotify: Option<std::io::Result<OwnedFd>>,
    /// The links on the way the acquisition watched in `inotify` (see
    /// `WatchHandle::add_watches_now`), for the watch.
    acquired_links: Vec<(i32, std::ffi::OsString)>,
    /// Whether the acquisition could watch our directory with inotify (see
    /// [`HeldFile::watched`]).
    watched: bool,
}

impl HeldFile {
    /// The lock file just taken: its record is written at once (the lock file alone), so that
    /// copies refused meanwhile can name us without waiting for the other backends.
    pub(crate) fn new(
        mut lock: HeldLock,
        inotify: Option<std::io::Result<OwnedFd>>,
        wait_watch: Option<OwnedFd>,
    ) -> Result<Self> {
        // Our directory and the way to it watched from now on, before anything else (the
        // record, the bus): a removal of our file, a directory on the way moved, a link on the
        // way flipped, is then an event the watch reads, however late its thread starts (a
        // holder stopped meanwhile), and a removal it did not see is never re-created (see
        // `NameHistory`). If our directory cannot be watched, the watch falls back to
        // re-checks.
        let mut acquired_links = Vec::new();
        let inotify = inotify.map(|inotify| {
            inotify.and_then(|fd| {
                acquired_links = lock.watch_handle().add_watches_now(&fd)?;
                Ok(fd)
            })
        });
        let watched = matches!(inotify, Some(Ok(_)));
        let record = LockRecord::for_self(vec![Backend::LockFile], None, None);
        lock.write_record(&record)?;
        Ok(HeldFile {
            lent_watch: None,
            watched,
            watch: None,
            lock,
            wait_watch,
            record,
            inotify,
            acquired_links,
        })
    }

    /// The held lock.
    pub(crate) fn lock(&self) -> &HeldLock {
        &self.lock
    }

    /// Whether changes at our lock file's path are seen as they happen: the acquisition had an
    /// inotify instance and watched our directory in it. False with the watch off.
    pub(crate) fn watched(&self) -> bool {
        self.watched
    }

    /// The watch's inotify instance, with every watch the acquisition and the watch added to it,
    /// for a process the lock is handed to (see
    /// [`InstanceGuard::lock_file_watch_descriptor`](crate::InstanceGuard::lock_file_watch_descriptor)).
    pub(crate) fn watch_instance(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.lent_watch.as_deref().map(AsFd::as_fd)
    }

    /// Completes the record with another backend taken (its bus and our unique name on it,
    /// for the bus's), so that refused copies can name us through it.
    pub(crate) fn record_also(
        &mut self,
        backend: Backend,
        bus: Option<BusKind>,
        unique_name: Option<String>,
    ) -> Result<()> {
        self.record.backend.push(backend);
        self.record.bus = bus.or(self.record.bus);
        self.record.bus_unique_name = unique_name.or(self.record.bus_unique_name.take());
        self.record.queued_on_bus = None;
        self.lock.write_record(&self.record)
    }

    /// Records that we wait in a bus's queue for the name, which another process owns, at
    /// `place` (or, with `None`, that we no longer do: the bus went away meanwhile), so that a
    /// copy refused by our lock file meanwhile does not take us for the running copy.
    pub(crate) fn record_queued(
        &mut self,
        place: Option<crate::holder::BusQueuePlace>,
    ) -> Result<()> {
        if self.record.queued_on_bus == place {
            return Ok(());
        }
        self.record.queued_on_bus = place;
        self.lock.write_record(&self.record)
    }

    /// For the bus's watch, to call when the connection closes: rewrites the record without
    /// the bus, which the lock file alone holds the instance through from then on. Otherwise
    /// the record would go on naming a connection on a bus that is gone, and a bus restarted
    /// at the same address gives out the same unique names again: `status` would take another
    /// process that owns the name there for us, and refused copies would say we are on the bus.
    pub(crate) fn bus_gone_recorder(&self) -> impl FnOnce() + Send + 'static {
        let lock = self.lock.watch_handle();
        let mut record = self.record.clone();
        record.backend.retain(|b| *b != Backend::Dbus);
        record.bus = None;
        record.bus_unique_name = None;
        move || rewrite_from_watch(&lock, &record)
    }

    /// Starts the watch as a thread of its own (see [`LockWatchThread`]), with a re-check
    /// every `recheck` if asked.
    pub(crate) fn start_watch(
        &mut self,
        recheck: Option<Duration>,
        losses: &LossLog,
    ) -> Result<()> {
        // Shared without a system call (no `dup` on the acquisition's path): the thread reads
        // it, the guard only lends it.
        let inotify = self
            .inotify
            .take()
            .map(|inotify| inotify.map(std::sync::Arc::new));
        if self.watched
            && let Some(Ok(inotify)) = &inotify
        {
            self.lent_watch = Some(std::sync::Arc::clone(inotify));
        }
        self.watch = LockWatchThread::start(
            &mut self.lock,
            inotify,
            std::mem::take(&mut self.acquired_links),
            recheck,
            losses.clone(),
        )?;
        Ok(())
    }

    /// Whether the lock file is ours at the moment it is called, for another backend's watch
    /// (the bus's, when its connection closes): not what held at acquisition, but what holds
    /// then, since the lock file may have gone unnoticed (the watch turned off, or a directory
    /// above it moved). A lock file found removed here is not re-created: this check did not
    /// see it go, so another copy may have come and gone meanwhile (see `NameHistory`); the
    /// watch, which may have seen it, decides on its own.
    pub(crate) fn still_held_check(&self) -> impl FnOnce() -> bool + Send + 'static {
        let lock = self.lock.watch_handle();
        move || lock.check_path().is_none() && lock.verify_held()
    }

    /// Whether the path still leads to the file our lock is on, and that file is locked,
    /// looked at now, taking no lock of the shared state: for a child after `fork`, where the
    /// watch thread does not exist and may have held that lock at the fork (taking it would wait
    /// for ever). Our file is the one our descriptor is open on.
    pub(crate) fn held_now_without_shared_state(&self) -> bool {
        use std::os::fd::AsFd;
        let Ok(st) = rustix::fs::fstat(self.lock.as_fd()) else {
            return false;
        };
        // Through our description (see `WatchHandle::verify_held`).
        let handle = self.lock.watch_handle();
        let unopposed = || super::ofd::is_locked_at_all(self.lock.as_fd()) == Ok(false);
        if super::ofd::holds_write_lock(self.lock.as_fd()) {
            handle.verify_held_as(st.st_dev, st.st_ino)
        } else {
            unopposed() && handle.verify_held_as(st.st_dev, st.st_ino) && unopposed()
        }
    }

    /// See [`HeldLock::release_report`].
    pub(crate) fn release_report(&self) -> super::ReleaseReport {
        self.lock.release_report()
    }

    /// Stops the watch, then removes the file while still holding the lock (see
    /// [`HeldLock::release`]).
    pub(crate) fn release(self) -> Result<()> {
        let HeldFile {
            lent_watch,
            watch,
            lock,
            wait_watch,
            ..
        } = self;
        // Ours first: the thread's is then the last, closed on its way out, not here.
        drop(lent_watch);
        drop(watch);
        let released = lock.release();
        drop(wait_watch);
        released
    }
}

/// Writes `record` in place of the lock file's, from another task than the guard's: padded to
/// the length of the line written last, as [`HeldLock::write_record`] pads, so that the file is
/// one whole record at every moment; and only while the lock is held, never after release
/// (the next copy's file may be at the path by then), nor into a file that is someone else's
/// (see `Now::keep_file`). Kept as the line a re-created file gets.
fn rewrite_from_watch(lock: &WatchHandle, record: &LockRecord) {
    let mut now = lock.shared.now();
    if now.released {
        return;
    }
    // Held only under the lock of `now`, and never after release (see `Files`).
    let Some(files) = lock.shared.files.upgrade() else {
        return;
    };
    let mut line = LockRecord {
        keep: false,
        ..record.clone()
    }
    .to_line();
    if now.keep_file {
        now.record = line;
        return;
    }
    let last_len = now.record.len();
    if line.len() < last_len {
        // `to_line` ends with the newline; JSON allows the spaces before it.
        line.pop();
        line.resize(last_len - 1, b' ');
        line.push(b'\n');
    }
    match write_or_unknown(files.lent(), &line, lock.path()) {
        Ok(_) => now.record = line,
        Err(e) => {
            // Said with the shared state let go (see `recover.rs`), and our descriptors before
            // it (see `Files`).
            drop(files);
            drop(now);
            tracing::warn!(path = %lock.path().display(), error = %e, "cannot rewrite the holder record without the bus")
        }
    }
}
