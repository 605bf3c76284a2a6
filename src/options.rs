//! The builder, [`InstanceOptions`]: what can be chosen about acquiring an instance.
//! It must not plan (`plan`) nor acquire (`acquire`).
//!
//! Over 400 lines for now: the lock file's waits and watchers below move to `lockfile` (the
//! other half of issue 11's round).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::dbus;
use crate::error::{Error, Result};
use crate::holder::{Holder, LockRecord};
use crate::lockfile::{self, Attempt, HeldLock, LockDir, PathChange};
use crate::loss::{Loss, LossLog, LossReason};
use crate::name::InstanceName;
use crate::plan::LockPlan;
use crate::scope::{Backend, Scope};

/// How long to wait when the instance is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Wait {
    /// Fail at once with [`Error::AlreadyRunning`].
    #[default]
    No,
    /// Wait until the holder exits, however long.
    Forever,
    /// Wait up to this long, then fail with [`Error::TimedOut`].
    Timeout(Duration),
}

/// Everything that can be chosen about acquiring an instance; [`crate::ensure_single_instance`]
/// is this with the defaults.
#[must_use = "options do nothing until acquire() or acquire_async() is called"]
pub struct InstanceOptions {
    pub(crate) name: String,
    /// `None`: not chosen in code, so [`SCOPE_ENV`](crate::SCOPE_ENV) or else [`Scope::Auto`].
    pub(crate) scope: Option<Scope>,
    pub(crate) backend: Backend,
    pub(crate) lock_file: Option<PathBuf>,
    pub(crate) lock_dir: Option<PathBuf>,
    pub(crate) wait: Wait,
    pub(crate) allow_replacement: bool,
    pub(crate) recheck: Option<Duration>,
    pub(crate) watch_lock: bool,
    pub(crate) allow_network_filesystem: bool,
    pub(crate) notify_ready: bool,
    pub(crate) exports: Vec<dbus::Export>,
}

impl fmt::Debug for InstanceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceOptions")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("backend", &self.backend)
            .field("lock_file", &self.lock_file)
            .field("lock_dir", &self.lock_dir)
            .field("wait", &self.wait)
            .field("allow_replacement", &self.allow_replacement)
            .field("recheck", &self.recheck)
            .field("watch_lock", &self.watch_lock)
            .field("allow_network_filesystem", &self.allow_network_filesystem)
            .field("notify_ready", &self.notify_ready)
            .field("exports", &self.exports.len())
            .finish()
    }
}

impl InstanceOptions {
    /// Options for `name` with every default: the scope from [`SCOPE_ENV`](crate::SCOPE_ENV) if set, else Auto;
    /// Auto backend (lock file and bus); no waiting, no replacement; the lock file watched with
    /// inotify, no periodic re-check; `READY=1` sent to systemd once acquired, when it asked
    /// for it.
    pub fn new(name: impl Into<String>) -> Self {
        InstanceOptions {
            name: name.into(),
            scope: None,
            backend: Backend::Auto,
            lock_file: None,
            lock_dir: None,
            wait: Wait::No,
            allow_replacement: false,
            recheck: None,
            // On by default: a holder must hear of its lock file going (logout removing the
            // runtime directory, an admin cleaning /run/lock), and the watch costs nothing idle.
            watch_lock: true,
            allow_network_filesystem: false,
            notify_ready: true,
            exports: Vec::new(),
        }
    }

    /// Sets the scope. Without this call the scope comes from the environment variable
    /// [`SCOPE_ENV`](crate::SCOPE_ENV) (`user`, `system` or `auto`), or else is [`Scope::Auto`]; with it, the
    /// environment is not consulted.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Sets which backends enforce exclusion.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Uses this exact lock file (for example inside the data directory the program protects).
    pub fn lock_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.lock_file = Some(path.into());
        self
    }

    /// Puts the lock file in this directory instead of the scope's. The environment variable
    /// [`LOCK_DIR_ENV`](crate::LOCK_DIR_ENV) does the same when this is not called.
    pub fn lock_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.lock_dir = Some(dir.into());
        self
    }

    /// Waits for a running copy to exit instead of failing at once.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Lets a later copy that asks with `REPLACE_EXISTING` take the bus name from this one; the
    /// guard then reports [`LossReason::Replaced`].
    pub fn allow_replacement(mut self, allow: bool) -> Self {
        self.allow_replacement = allow;
        self
    }

    /// Re-checks every `interval` that the lock file path still names our file, and reports
    /// [`LossReason::LockFileRemoved`] / [`LossReason::LockFileReplaced`] if not (as PostgreSQL
    /// does for `postmaster.pid`). Off by default: an idle holder then never wakes up.
    pub fn recheck_lock_file(mut self, interval: Duration) -> Self {
        self.recheck = Some(interval);
        self
    }

    /// Watches the lock file's directory with inotify and reports
    /// [`LossReason::LockFileRemoved`] / [`LossReason::LockFileReplaced`] /
    /// [`LossReason::LockDirectoryRemoved`] as soon as someone removes or replaces the file or
    /// its directory: no timer, so an idle holder still never wakes up (only a change in the
    /// lock directory wakes it). If inotify cannot be set up (its limits reached), a re-check
    /// every 10 seconds is used instead, with a `warn` line. **On by default**; `false` turns
    /// it off (the lock file is then still re-checked when the bus connection closes, before a
    /// loss claims it still excludes).
    ///
    /// A guard with a lock file alone, from the blocking [`InstanceOptions::acquire`] and with
    /// no wait, has no runtime: its watch is a small thread asleep in `poll`, started with the
    /// guard and stopped before the guard removes its lock file.
    ///
    /// The mount table is watched too (`POLLPRI` on `/proc/self/mountinfo`): a file system
    /// mounted over the lock directory, or over one above it, is seen at once. Other changes to
    /// directories above it (a rename of a plain directory) are not watched (inotify cannot):
    /// they are seen when the lock directory itself changes, when the bus connection closes, or
    /// by [`InstanceOptions::recheck_lock_file`].
    pub fn watch_lock_file(mut self, watch: bool) -> Self {
        self.watch_lock = watch;
        self
    }

    /// Allows a lock directory on a network file system (NFS, CIFS, ...), where locks may not
    /// exclude other hosts. Refused by default.
    pub fn allow_network_filesystem(mut self, allow: bool) -> Self {
        self.allow_network_filesystem = allow;
        self
    }

    /// Under a `Type=notify` systemd unit (`NOTIFY_SOCKET` is set), tells systemd the service is
    /// ready — `READY=1` and a `STATUS=` line naming the instance — as soon as the instance is
    /// acquired; a refused or waiting copy sends a `STATUS=` line saying who runs. On by default.
    ///
    /// Turn it off when the program has more to set up after acquiring, and call
    /// [`InstanceGuard::notify_ready`](crate::InstanceGuard::notify_ready) once it really is ready. The environment is never
    /// changed, so child processes still see `NOTIFY_SOCKET`; systemd ignores what they send
    /// unless the unit says `NotifyAccess=all`.
    pub fn notify_ready(mut self, notify: bool) -> Self {
        self.notify_ready = notify;
        self
    }

    /// Serves `iface` at `path` on the bus connection from its start, before it reads its first
    /// message, so that anyone who sees the name can call it at once.
    ///
    /// An invalid `path`, or the same interface twice at one path, fails the acquisition with
    /// [`Error::Bus`] ("cannot export an object").
    pub fn serve_at<I>(mut self, path: &'static str, iface: I) -> Self
    where
        I: zbus::object_server::Interface,
    {
        self.exports.push(Box::new(
            move |builder: zbus::connection::Builder<'static>| builder.serve_at(path, iface),
        ));
        self
    }

    /// Who holds this instance's lock file right now, if anyone: asked without taking,
    /// creating or writing anything, and without starting a runtime or touching the bus. A
    /// program that would rather not start at all than wait can decide with it before it sets
    /// anything up (the command-line tool does, so that a refused copy costs little); the
    /// answer is only ever a snapshot, and [`InstanceOptions::acquire`] still decides.
    ///
    /// `None` when nobody holds it, or when the D-Bus backend alone was chosen (ask [`crate::status`]).
    ///
    /// # Errors
    ///
    /// The planning errors of [`InstanceOptions::plan`]; [`Error::UnsafeLockPath`] when the lock
    /// path is a symlink; [`Error::Io`] when the lock file cannot be examined.
    pub fn lock_file_holder(&self) -> Result<Option<Holder>> {
        match self.plan()?.lock_file {
            Some(path) => lockfile::holder_of(&path),
            None => Ok(None),
        }
    }
}

/// Tries the lock file once; gives back the directory too, to wait with.
pub(crate) async fn try_lock(
    plan: &LockPlan,
    allow_network_fs: bool,
) -> Result<(Attempt, LockDir)> {
    let mut dir = lockfile::open_dir(plan, allow_network_fs)?;
    Ok((lockfile::lock_async(plan, &mut dir).await?, dir))
}

/// Waits for the lock file held by `holder`, without a thread and without blocking: each
/// attempt is a non-blocking one, made again whenever inotify reports that the lock may have
/// been released (see [`lockfile::may_be_free`]), and at least every [`RECHECK_EVERY`].
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
            Err(_) => Err(Error::TimedOut {
                name: name.to_string(),
                waited: timeout,
                holder: Box::new(lockfile::peek_holder(&plan.path()).unwrap_or(*holder)),
            }),
        },
        None => waited.await,
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
/// quiet, to be kept (see [`lockfile::ReleaseWatch::into_quiet`]).
type Waited = (HeldLock, Option<LockRecord>, Option<std::os::fd::OwnedFd>);

/// A [`lockfile::release_watch`] on `dir`, registered with the runtime; `None` (logged) when
/// inotify cannot be used.
fn watch_release(
    plan: &LockPlan,
    dir: &LockDir,
) -> Option<tokio::io::unix::AsyncFd<lockfile::ReleaseWatch>> {
    // `AsyncFd::new` is deprecated because a `T` could close its descriptor behind tokio's back;
    // a `ReleaseWatch` moved in here cannot (see `watch_lock`).
    #[allow(deprecated)]
    match lockfile::release_watch(dir).and_then(tokio::io::unix::AsyncFd::new) {
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
    loop {
        let free = match &mut watch {
            Some(watch) => {
                // Events up to here are answered by the check below.
                lockfile::drain(watch.get_ref().fd());
                lockfile::may_be_free(watch.get_mut(), plan, dir)
            }
            None => true,
        };
        if free {
            match lockfile::lock_async(plan, dir).await? {
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
            }
        }
        if dir.id() != watched {
            // The attempt found the directory removed or replaced and opened the new one: the
            // old watch would wait on a directory nobody uses any more.
            watch = watch_release(plan, dir);
            watched = dir.id();
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
        let event = async {
            loop {
                let Ok(mut ready) = watch.readable().await else {
                    // Cannot happen with a registered descriptor; re-check rather than spin.
                    return std::future::pending::<()>().await;
                };
                let got = lockfile::drain_any(ready.get_inner().fd());
                ready.clear_ready();
                if got {
                    return;
                }
            }
        };
        static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        lockfile::stop_for_test("UNIQUE_INSTANCE_TEST_STOP_IN_LOCK_WAIT", &STOPPED);
        tokio::select! {
            () = event => {
                recheck = RECHECK_FIRST;
                quick = QUICK_RECHECKS;
            }
            () = tokio::time::sleep(recheck) => {
                recheck = (recheck * 2).min(RECHECK_EVERY);
            }
        }
    }
}

pub(crate) fn options_wait(options: &InstanceOptions) -> Duration {
    match options.wait {
        Wait::Timeout(d) => d,
        _ => Duration::ZERO,
    }
}

/// Has the lock path stopped leading to our file, and how? `None` while it still does (or
/// cannot be told, which is not evidence of a loss).
fn lock_change(handle: &lockfile::WatchHandle) -> Option<LossReason> {
    handle.check_path()?;
    Some(match handle.check_in_dir() {
        Some(PathChange::Removed) => LossReason::LockFileRemoved,
        Some(PathChange::Replaced) => LossReason::LockFileReplaced,
        // Our directory still has our file, but the path no longer leads there: the directory,
        // or one on the way, was moved, removed or replaced (or a symlink retargeted).
        None => LossReason::LockDirectoryRemoved,
    })
}

/// What a watch does about a change it found (`reason`): re-create a lock file that was only
/// removed, or report the loss. `false` when the watch is over (lost, or released meanwhile).
fn lock_changed(
    handle: &lockfile::WatchHandle,
    reason: LossReason,
    above: Option<std::os::fd::RawFd>,
    losses: &LossLog,
) -> bool {
    match handle.recover(above) {
        lockfile::Recovery::Held | lockfile::Recovery::Recreated => true,
        lockfile::Recovery::Released => false,
        lockfile::Recovery::Lost => {
            report_lock_loss(handle, reason, losses);
            false
        }
    }
}

pub(crate) async fn recheck_lock(
    handle: lockfile::WatchHandle,
    interval: Duration,
    losses: LossLog,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Some(reason) = lock_change(&handle)
            && !lock_changed(&handle, reason, None, &losses)
        {
            return;
        }
    }
}

/// How often the lock file is re-checked when inotify is not available for
/// [`InstanceOptions::watch_lock_file`].
pub(crate) const WATCH_FALLBACK_INTERVAL: Duration = Duration::from_secs(10);

/// Re-checks the lock file whenever its directory changes (or is itself removed or moved), and
/// only then.
pub(crate) async fn watch_lock(
    handle: lockfile::WatchHandle,
    inotify: CloseAside,
    losses: LossLog,
) {
    // `AsyncFd::new` is deprecated because a `T` could close its descriptor behind tokio's back;
    // an `OwnedFd` moved in here (in its `CloseAside`) cannot, and `register` (its replacement)
    // is `unsafe`, which this crate forbids.
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
            && !lock_changed(
                &handle,
                reason,
                Some(std::os::fd::AsRawFd::as_raw_fd(events.get_ref())),
                &losses,
            )
        {
            return;
        }
        tokio::select! {
            ready = events.readable() => match ready {
                Ok(mut ready) => {
                    lockfile::drain(&ready.get_inner().0);
                    ready.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inotify failed; re-checking the lock file every 10 s instead");
                    return recheck_lock(handle, WATCH_FALLBACK_INTERVAL, losses).await;
                }
            },
            () = mount_table_changed(mounts.as_ref()) => {}
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

/// An inotify instance that is closed for good on a thread of its own: the last close of one
/// waits for an RCU grace period (milliseconds, more on a busy machine), which would stall
/// whoever drops the watch — the guard's release, or the runtime that drops the aborted task.
/// Only a duplicate goes to that thread; if it cannot be made or started, the close is here.
pub(crate) struct CloseAside(pub(crate) std::os::fd::OwnedFd);

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
fn report_lock_loss(handle: &lockfile::WatchHandle, reason: LossReason, losses: &LossLog) {
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
    /// Starts the watch of `held` on `inotify` (a [`lockfile::new_inotify`] instance, or the
    /// error making it: then a re-check every 10 seconds).
    pub(crate) fn start(
        held: &mut HeldLock,
        inotify: std::io::Result<std::os::fd::OwnedFd>,
        losses: LossLog,
    ) -> Result<Self> {
        let handle = held.watch_handle();
        let inotify = match handle.inotify(inotify) {
            Ok(inotify) => {
                held.move_above(&inotify)?;
                Some(inotify)
            }
            Err(e) => {
                tracing::warn!(path = %handle.path().display(), error = %e,
                    "cannot watch the lock file with inotify; re-checking it every 10 s instead");
                None
            }
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
    handle: &lockfile::WatchHandle,
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
            && !lock_changed(
                handle,
                reason,
                inotify.map(std::os::fd::AsRawFd::as_raw_fd),
                losses,
            )
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
        if changed && let Some(events) = inotify {
            lockfile::drain(events);
        }
    }
}
