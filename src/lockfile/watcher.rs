//! The watches of a held lock while the instance runs: a task woken by inotify (or the mount
//! table), a periodic re-check, or a plain thread for a guard without a runtime; each
//! re-creates a lock file that was only removed, and reports a loss once.
//! Must not: decide what a change is (`watch.rs`) or how to re-create (`recover.rs`).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::loss::{Loss, LossLog, LossReason};

use super::held::HeldLock;
use super::recover::Recovery;
use super::watch::{PathChange, WatchHandle, drain};

/// Has the lock path stopped leading to our file, and how? `None` while it still does. A path
/// that can no longer be followed (`EACCES`) has stopped: it cannot be confirmed.
fn lock_change(handle: &WatchHandle) -> Option<LossReason> {
    handle.check_path()?;
    Some(match handle.check_in_dir() {
        Some(PathChange::Removed) => LossReason::LockFileRemoved,
        Some(PathChange::Replaced) => LossReason::LockFileReplaced,
        // Our directory still has our file (or cannot be looked in any more), but the path no
        // longer leads there: the directory, or one on the way, was moved, removed or replaced
        // (or a symlink retargeted), or made one we may not enter.
        None | Some(PathChange::Unreachable) => LossReason::LockDirectoryRemoved,
    })
}

/// What a watch does about a change it found (`reason`): re-create a lock file that was only
/// removed, or report the loss. `false` when the watch is over (lost, or released meanwhile).
fn lock_changed(handle: &WatchHandle, reason: LossReason, losses: &LossLog) -> bool {
    match handle.recover() {
        Recovery::Held | Recovery::Recreated => true,
        Recovery::Released => false,
        Recovery::Lost => {
            report_lock_loss(handle, reason, losses);
            false
        }
    }
}

async fn recheck_lock(handle: WatchHandle, interval: Duration, losses: LossLog) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Some(reason) = lock_change(&handle)
            && !lock_changed(&handle, reason, &losses)
        {
            return;
        }
    }
}

/// How often the lock file is re-checked when inotify is not available for
/// [`InstanceOptions::watch_lock_file`](crate::InstanceOptions::watch_lock_file).
const WATCH_FALLBACK_INTERVAL: Duration = Duration::from_secs(10);

/// Re-checks the lock file whenever its directory changes (or is itself removed or moved), and
/// only then. The watches are added to `inotify` here, before the first check; without them, it
/// re-checks every 10 seconds.
async fn watch_lock(handle: WatchHandle, inotify: std::io::Result<CloseAside>, losses: LossLog) {
    let inotify = match inotify.and_then(|fd| handle.add_watches(&fd.0).map(|()| fd)) {
        Ok(inotify) => inotify,
        Err(e) => {
            tracing::warn!(path = %handle.path().display(), error = %e,
                "cannot watch the lock file with inotify; re-checking it every 10 s instead");
            return recheck_lock(handle, WATCH_FALLBACK_INTERVAL, losses).await;
        }
    };
    // `AsyncFd::new` is deprecated because a `T` could close its descriptor behind tokio's back;
    // an `OwnedFd` moved in here (in its `CloseAside`) cannot, and `register` (its replacement)
    // is `unsafe`, which this crate denies.
    #[allow(deprecated)]
    let events = match tokio::io::unix::AsyncFd::new(inotify) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll inotify; re-checking the lock file every 10 s instead");
            return recheck_lock(handle, WATCH_FALLBACK_INTERVAL, losses).await;
        }
    };
    #[allow(deprecated)]
    let mounts = mount_table().and_then(|fd| {
        tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::PRIORITY).ok()
    });
    loop {
        // Checked after the watch exists (and after each batch of events), so a change made
        // before the watch was in place is not missed.
        if let Some(reason) = lock_change(&handle)
            && !lock_changed(&handle, reason, &losses)
        {
            return;
        }
        tokio::select! {
            ready = events.readable() => match ready {
                Ok(mut ready) => {
                    drain(&ready.get_inner().0);
                    ready.clear_ready();
                    // Before the next check: see `WatchHandle::rewatch`.
                    handle.rewatch(&ready.get_inner().0);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inotify failed; re-checking the lock file every 10 s instead");
                    return recheck_lock(handle, WATCH_FALLBACK_INTERVAL, losses).await;
                }
            },
            // A mount over a directory on the way: the path goes through others now.
            () = mount_table_changed(mounts.as_ref()) => handle.rewatch(&events.get_ref().0),
        }
    }
}

/// The mount table of our mount namespace, to be polled for `POLLPRI`, which it reports
/// whenever something is mounted or unmounted: a file system mounted over the lock directory
/// (or one above it) makes the path lead elsewhere, and inotify on the covered directory sees
/// nothing. `None` without `/proc`: then only the directory's own events wake the watch.
fn mount_table() -> Option<std::os::fd::OwnedFd> {
    rustix::fs::open(
        "/proc/self/mountinfo",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NONBLOCK,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

/// Resolves when the mount table changed; never, without one (or once polling it failed).
async fn mount_table_changed(mounts: Option<&tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>) {
    if let Some(mounts) = mounts
        && let Ok(mut ready) = mounts.ready(tokio::io::Interest::PRIORITY).await
    {
        ready.clear_ready();
        return;
    }
    std::future::pending().await
}

/// Starts the watches of `held` for as long as the instance runs, as tasks on the current
/// runtime: its directory watched with `inotify` (a [`new_inotify`](super::watch::new_inotify)
/// instance made before the lock, see [`HeldLock::move_above`]; its watches are added by the
/// task, see [`WatchHandle::add_watches`]; when it could not be made or set up, a re-check
/// every 10 seconds instead), and a re-check every `recheck`, if asked.
/// `inotify` is `None` when the watch was turned off.
pub(crate) fn start_watch(
    held: &mut HeldLock,
    inotify: Option<std::io::Result<std::os::fd::OwnedFd>>,
    recheck: Option<Duration>,
    losses: &LossLog,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if let Some(inotify) = inotify {
        // Only the lock's descriptor is moved above the instance here; the watches are added by
        // the task (see `WatchHandle::add_watches`), so that the acquisition does not wait for
        // them.
        let inotify = match inotify {
            Ok(inotify) => {
                held.move_above(&inotify)?;
                Ok(CloseAside(inotify))
            }
            Err(e) => Err(e),
        };
        tasks.push(tokio::spawn(watch_lock(
            held.watch_handle(),
            inotify,
            losses.clone(),
        )));
    }
    if let Some(interval) = recheck {
        tasks.push(tokio::spawn(recheck_lock(
            held.watch_handle(),
            interval,
            losses.clone(),
        )));
    }
    Ok(tasks)
}

/// An inotify instance that is closed for good on a thread of its own: the last close of one
/// waits for an RCU grace period (milliseconds, more on a busy machine), which would stall
/// whoever drops the watch — the guard's release, or the runtime that drops the aborted task.
/// Only a duplicate goes to that thread; if it cannot be made or started, the close is here.
struct CloseAside(std::os::fd::OwnedFd);

impl std::os::fd::AsRawFd for CloseAside {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Drop for CloseAside {
    fn drop(&mut self) {
        if let Ok(last) = self.0.try_clone() {
            let _ = std::thread::Builder::new()
                .name("unique-instance-close".into())
                .spawn(move || drop(last));
        }
    }
}

/// Logs the loss of the lock file, once: the watch and a periodic re-check may both see it.
fn report_lock_loss(handle: &WatchHandle, reason: LossReason, losses: &LossLog) {
    losses.send_if_modified(|log| {
        let reported = log.iter().any(|l| {
            matches!(
                l.reason,
                LossReason::LockFileRemoved
                    | LossReason::LockFileReplaced
                    | LossReason::LockDirectoryRemoved
            )
        });
        if reported {
            return false;
        }
        tracing::warn!(path = %handle.path().display(), %reason, "lost the lock file");
        // Never "still exclusive", even with the bus name still ours: the name keeps out only
        // copies that reach the same bus, and every copy takes the lock file first.
        log.push(Loss {
            reason,
            still_exclusive: false,
        });
        true
    });
}

/// The lock-file watch of a guard without a runtime (the lock file alone, from the blocking
/// API, with no wait): a thread asleep in `poll` on the inotify instance and on an eventfd that
/// ends it. It costs a thread start at acquisition and nothing while idle; a runtime and its
/// service thread would cost several times more on the fastest acquisition path.
pub(crate) struct LockWatchThread {
    stop: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Disconnected once the thread has stopped checking. Waited for instead of joining the
    /// thread: its exit closes the inotify instance, which waits for an RCU grace period
    /// (milliseconds), and the guard's release need not wait for that.
    stopped: std::sync::mpsc::Receiver<()>,
    /// The process that started the thread: after `fork` it does not exist in the child.
    pid: u32,
}

impl LockWatchThread {
    /// Starts the watch of `held` on `inotify` (a [`new_inotify`](super::watch::new_inotify) instance, or the
    /// error making it: then a re-check every 10 seconds).
    pub(crate) fn start(
        held: &mut HeldLock,
        inotify: std::io::Result<std::os::fd::OwnedFd>,
        losses: LossLog,
    ) -> Result<Self> {
        let handle = held.watch_handle();
        // Only the lock's descriptor is moved above the instance here; the watches are added by
        // the thread, off the acquisition's path (see `WatchHandle::add_watches`).
        let inotify = match inotify {
            Ok(inotify) => {
                held.move_above(&inotify)?;
                Ok(inotify)
            }
            Err(e) => Err(e),
        };
        let cannot = |e| Error::io("cannot start the thread that watches", handle.path(), e);
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| cannot(e.into()))?;
        let stop = std::sync::Arc::new(stop);
        let thread_stop = std::sync::Arc::clone(&stop);
        let thread_handle = handle.clone();
        let (checking, stopped) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("unique-instance-watch".into())
            .spawn(move || {
                let inotify = match inotify
                    .and_then(|fd| thread_handle.add_watches(&fd).map(|()| fd))
                {
                    Ok(inotify) => Some(inotify),
                    Err(e) => {
                        tracing::warn!(path = %thread_handle.path().display(), error = %e,
                            "cannot watch the lock file with inotify; re-checking it every 10 s instead");
                        None
                    }
                };
                watch_lock_blocking(&thread_handle, inotify.as_ref(), &thread_stop, &losses);
                // Tells the guard that no more checks are made, before the inotify instance is
                // closed (slowly) on the way out.
                drop(checking);
                drop(inotify);
            })
            .map_err(cannot)?;
        Ok(LockWatchThread {
            stop,
            stopped,
            pid: std::process::id(),
        })
    }
}

impl Drop for LockWatchThread {
    fn drop(&mut self) {
        // In a forked child the thread does not exist (a join would wait forever), and the
        // eventfd is shared with the parent, whose watch must go on: leave both alone.
        if std::process::id() != self.pid {
            return;
        }
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        // Returns (disconnected) once the thread checks no more: our own removal of the lock
        // file, which follows, is then never reported as a loss.
        let _ = self.stopped.recv();
    }
}

/// The body of [`LockWatchThread`]: [`watch_lock`] without a runtime. Returns when told to
/// stop, or once it has reported the lock file lost.
fn watch_lock_blocking(
    handle: &WatchHandle,
    mut inotify: Option<&std::os::fd::OwnedFd>,
    stop: &std::os::fd::OwnedFd,
    losses: &LossLog,
) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let fallback = Timespec {
        tv_sec: WATCH_FALLBACK_INTERVAL.as_secs() as i64,
        tv_nsec: 0,
    };
    // Polled for POLLPRI: see `mount_table`.
    let mounts = mount_table();
    loop {
        // Checked once the watch exists and after each batch of events, as in `watch_lock`.
        if let Some(reason) = lock_change(handle)
            && !lock_changed(handle, reason, losses)
        {
            return;
        }
        let mut fds = vec![PollFd::new(stop, PollFlags::IN)];
        if let Some(mounts) = &mounts {
            fds.push(PollFd::new(mounts, PollFlags::PRI));
        }
        if let Some(events) = inotify {
            fds.push(PollFd::new(events, PollFlags::IN));
        }
        let timeout = inotify.is_none().then_some(&fallback);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) if inotify.is_some() => {
                tracing::warn!(error = %e, "inotify failed; re-checking the lock file every 10 s instead");
                inotify = None;
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %handle.path().display(), error = %e,
                    "cannot wait any more; the lock file is no longer watched");
                return;
            }
        }
        if !fds[0].revents().is_empty() {
            return;
        }
        // The mount table needs nothing done: a poll re-arms it. Inotify's events are drained.
        let changed = inotify.is_some() && fds.last().is_some_and(|fd| !fd.revents().is_empty());
        drop(fds);
        if let Some(events) = inotify {
            if changed {
                drain(events);
            }
            // Before the next check: see `WatchHandle::rewatch`.
            handle.rewatch(events);
        }
    }
}
