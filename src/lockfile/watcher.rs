//! The watch of a held lock while the instance runs: a plain thread woken by inotify, the mount
//! table or a periodic re-check, whatever runtime acquired (see [`LockWatchThread`]); it
//! re-creates a lock file that was only removed, and reports a loss once.
//! Must not: decide what a change is (`watch.rs`) or how to re-create (`recover.rs`).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::loss::{Loss, LossLog, LossReason};

use super::held::HeldLock;
use super::recover::Judgement;
use super::watch::{NameHistory, WatchHandle};

/// How often the lock file is re-checked when inotify is not available for
/// [`InstanceOptions::watch_lock_file`](crate::InstanceOptions::watch_lock_file). A change
/// found so was not seen happen: a loss, even a removal alone (see `NameHistory`). Short,
/// because until then another copy may run beside this one (it was 10 s: a review saw two
/// copies side by side for 8 s); a look costs a few system calls.
const WATCH_FALLBACK_INTERVAL: Duration = Duration::from_secs(1);

/// The longest single sleep of the watch: a longer re-check interval (up to `Duration::MAX`)
/// only wakes it once a day to sleep again, rather than handing `poll` a time it may refuse.
const LONGEST_SLEEP: Duration = Duration::from_secs(24 * 60 * 60);

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

/// Logs the loss of the lock file, once: the watch and a periodic re-check may both see it.
/// Told first, then said: a log line may block (a subscriber writing to a stderr nobody reads),
/// and must never hold up the loss, nor be written with the loss log locked (a review: with
/// `RUST_LOG` set, `run` never stopped COMMAND).
fn report_lock_loss(handle: &WatchHandle, reason: LossReason, losses: &LossLog) {
    let told = losses.send_if_modified(|log| {
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
        // Never "still exclusive", even with the bus name still ours: the name keeps out only
        // copies that reach the same bus, and every copy takes the lock file first.
        log.push(Loss {
            reason,
            still_exclusive: false,
        });
        true
    });
    if told {
        tracing::warn!(path = %handle.path().display(), %reason, "lost the lock file");
    }
}

/// The lock-file watch of every guard: a thread asleep in `poll` on the inotify instance, on
/// the mount table and on an eventfd that ends it, waking also every re-check interval if one
/// was asked (or every second when inotify could not be set up). It needs no runtime, so
/// an async guard stays watched whatever its program does with the runtime that acquired it
/// (drops it, or never runs it again). It costs a thread start at acquisition and nothing
/// while idle.
pub(crate) struct LockWatchThread {
    stop: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Disconnected once the thread has stopped checking and dropped every descriptor but the
    /// inotify instance's. Waited for instead of joining the thread: its exit closes the inotify
    /// instance, which waits for an RCU grace period (milliseconds, up to hundreds on a busy
    /// machine), and the guard's release need not wait for that. So the thread and the
    /// instance's descriptor outlive the release by that long, and nothing else does. (The
    /// guard's share of the instance, lent for hand-over, is dropped before this is: the
    /// thread's is the last.) In a mutex only so that the guard is `Sync`: it is used once, by
    /// `drop`.
    stopped: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    /// The process that started the thread: after `fork` it does not exist in the child.
    pid: u32,
}

impl LockWatchThread {
    /// Starts the watch of `held`: on `inotify` (a [`new_inotify`](super::watch::new_inotify)
    /// instance, or the error making it: then a re-check every second; `None` when the watch
    /// is off), and a re-check every `recheck` if asked. `None` when there is nothing to watch.
    /// The instance may be shared (the guard lends it for hand-over): this thread alone reads
    /// it, and drops its share on its way out.
    pub(crate) fn start(
        held: &mut HeldLock,
        inotify: Option<std::io::Result<std::sync::Arc<std::os::fd::OwnedFd>>>,
        acquired_links: Vec<(i32, std::ffi::OsString)>,
        recheck: Option<Duration>,
        losses: LossLog,
    ) -> Result<Option<Self>> {
        if inotify.is_none() && recheck.is_none() {
            return Ok(None);
        }
        let handle = held.watch_handle();
        // Only the lock's descriptor is moved above the instance here; the watches are added by
        // the thread, off the acquisition's path (see `WatchHandle::add_watches`).
        let inotify = match inotify {
            Some(Ok(inotify)) => {
                held.move_above(&inotify)?;
                Some(Ok(inotify))
            }
            other => other,
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
                crate::test_hooks::stop_at(crate::test_hooks::Hook::BeforeLockWatch);
                let mut every = recheck;
                // What the events said of our name since the path last led to our file.
                let mut history =
                    NameHistory::new(thread_handle.recreated(), thread_handle.acquired_way());
                // The links the acquisition watched: their events may be queued already, and
                // the path may go another way by now.
                history.note_links(acquired_links);
                let inotify = match inotify
                    .map(|r| r.and_then(|fd| thread_handle.add_watches(&fd).map(|w| (fd, w))))
                {
                    Some(Ok((fd, watches))) => {
                        if !watches.complete {
                            tracing::warn!(path = %thread_handle.path().display(),
                                "cannot watch every directory on the lock path with inotify; \
                                 re-checking the path every second as well (a symlink there flipped \
                                 away and back between two re-checks goes unseen)");
                            every = shortest(every, WATCH_FALLBACK_INTERVAL);
                        }
                        let dir_watch = watches.dir;
                        history.note_others_may_rename(watches.others_may_rename);
                        history.note_links(watches.links);
                        Some((fd, dir_watch))
                    }
                    Some(Err(e)) => {
                        tracing::warn!(path = %thread_handle.path().display(), error = %e,
                            "cannot watch the lock file with inotify; re-checking it every second instead");
                        every = shortest(every, WATCH_FALLBACK_INTERVAL);
                        None
                    }
                    None => None,
                };
                watch_lock_blocking(
                    &thread_handle,
                    inotify.as_ref().map(|(fd, wd)| (&**fd, *wd)),
                    every,
                    &thread_stop,
                    &losses,
                    history,
                );
                // Everything but the inotify instance goes before the guard is told that no more
                // checks are made: the lock directory's descriptor, the eventfd (the guard's
                // share of both is gone by now, or goes as it returns) and the loss log, so that
                // the release leaves none of them behind. Only then is the instance closed, on
                // the way out: that waits for an RCU grace period (tens of milliseconds on a
                // busy machine), which the release does not wait for; the thread ends with it.
                drop(thread_stop);
                drop(thread_handle);
                drop(losses);
                drop(checking);
                drop(inotify);
            })
            .map_err(cannot)?;
        Ok(Some(LockWatchThread {
            stop,
            stopped: std::sync::Mutex::new(stopped),
            pid: std::process::id(),
        }))
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
        let stopped = self.stopped.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = stopped.recv();
    }
}

/// Sleeps `interval`, or less if told to stop meanwhile (a write to `stop`, read here): then
/// `true`. What the watch does when it cannot `poll`: it looks at `stop` every
/// [`NAP_SLICE`], so a release waits at most that long for it.
fn nap_unless_stopped(stop: &std::os::fd::OwnedFd, interval: Duration) -> bool {
    let until = std::time::Instant::now() + interval;
    loop {
        let mut count = [0u8; 8];
        // The eventfd is non-blocking: `EAGAIN` until a stop is asked.
        if rustix::io::read(stop, &mut count).is_ok() {
            return true;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(NAP_SLICE));
    }
}

/// How often a watch that cannot `poll` looks whether it is told to stop.
const NAP_SLICE: Duration = Duration::from_millis(10);

/// The shorter of a re-check interval (if any) and `other`.
fn shortest(every: Option<Duration>, other: Duration) -> Option<Duration> {
    Some(every.map_or(other, |every| every.min(other)))
}

/// The body of [`LockWatchThread`]. Returns when told to stop, or once it has reported the
/// lock file lost.
///
/// `inotify` is the instance and the watch descriptor of our directory in it. Its events are
/// read, not only drained: a file made at our name by anyone but us (more files made there than
/// we re-created) means that another copy took the path while ours was gone. A holder that was
/// stopped (SIGSTOP) while its file was removed and another copy came and went finds, once it
/// runs again, the path free: re-creating the file then would hide that another copy ran, so
/// that is a loss. (An overflowed queue says nothing either way: it counts as such a file.) So
/// is a removal found that no event showed: one made before the watches were in place (the
/// holder was stopped just after acquiring), or any, without inotify (see [`NameHistory`]).
fn watch_lock_blocking(
    handle: &WatchHandle,
    mut inotify: Option<(&std::os::fd::OwnedFd, i32)>,
    mut every: Option<Duration>,
    stop: &std::os::fd::OwnedFd,
    losses: &LossLog,
    mut history: NameHistory,
) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    // Polled for POLLPRI: see `mount_table`.
    let mounts = mount_table();
    let mut cannot_poll = false;
    loop {
        // Read before each check, whatever woke us: `poll` fails with EINTR after a stop and a
        // SIGCONT, the very case these events are read for.
        if let Some((events, dir_watch)) = inotify
            && history.read(events, dir_watch, handle.file_name())
            && history.link_made()
        {
            crate::test_hooks::stop_at(crate::test_hooks::Hook::AfterLinkRead);
        }
        // Checked once the watch exists and after each batch of events or each interval, so a
        // change made before the watch was in place is not missed: it is a loss (see
        // `NameHistory`), since whether another copy came meanwhile cannot be known.
        match handle.judge(&mut history, inotify) {
            // The file is ours at its path; the lock on it may still have been let go by a
            // process sharing its descriptor, which no event tells.
            Judgement::Held => {
                if handle.let_go() {
                    report_lock_loss(handle, LossReason::LockLetGo, losses);
                    return;
                }
            }
            Judgement::Recreated | Judgement::Nowhere => {}
            Judgement::Lost(reason) => {
                report_lock_loss(handle, reason, losses);
                return;
            }
            Judgement::Over => return,
        }
        let timeout = every.map(|every| every.min(LONGEST_SLEEP));
        if cannot_poll {
            if nap_unless_stopped(stop, timeout.unwrap_or(WATCH_FALLBACK_INTERVAL)) {
                handle.note_verdict(handle.verdict(&mut history, None));
                return;
            }
            continue;
        }
        let mut fds = vec![PollFd::new(stop, PollFlags::IN)];
        if let Some(mounts) = &mounts {
            fds.push(PollFd::new(mounts, PollFlags::PRI));
        }
        if let Some((events, _)) = inotify {
            fds.push(PollFd::new(events, PollFlags::IN));
        }
        let timeout = timeout.map(|every| Timespec {
            tv_sec: every.as_secs() as i64,
            tv_nsec: every.subsec_nanos().into(),
        });
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) if inotify.is_some() => {
                tracing::warn!(error = %e, "inotify failed; re-checking the lock file every second instead");
                inotify = None;
                every = shortest(every, WATCH_FALLBACK_INTERVAL);
                continue;
            }
            Err(e) => {
                // `EINVAL` once the program lowered its descriptor limit below the few polled,
                // `ENOMEM`: the watch goes on without `poll`, never silently stops.
                tracing::warn!(path = %handle.path().display(), error = %e,
                    "cannot poll; re-checking the lock file every second by timer instead");
                cannot_poll = true;
                every = shortest(every, WATCH_FALLBACK_INTERVAL);
                continue;
            }
        }
        if !fds[0].revents().is_empty() {
            // Told to stop: a release follows, which judges a change not acted on yet. What the
            // events say of it is left for that judgement (see `Now::watch_verdict`).
            if let Some((events, dir_watch)) = inotify {
                history.read(events, dir_watch, handle.file_name());
            }
            handle.note_verdict(handle.verdict(&mut history, inotify));
            return;
        }
        // The mount table needs nothing done: a poll re-arms it. Inotify's events are read at
        // the top of the loop.
        drop(fds);
        if let Some((events, _)) = inotify {
            // Before the next check: see `WatchHandle::rewatch`.
            let _ = handle.rewatch(events, &mut history);
        }
    }
}
