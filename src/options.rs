//! The builder, [`InstanceOptions`]: what can be chosen about acquiring an instance.
//! It must not plan (`plan`) nor acquire (`acquire`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::dbus;
use crate::error::Result;
use crate::holder::Holder;
use crate::lockfile;
use crate::scope::{Backend, BackendSelection, Scope};

// For the doc links: the code itself no longer needs them here.
#[cfg(doc)]
use crate::{error::Error, loss::LossReason};

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

/// The shortest re-check interval (see [`InstanceOptions::recheck_lock_file`]).
const MIN_RECHECK: Duration = Duration::from_millis(10);

/// Everything that can be chosen about acquiring an instance; [`crate::ensure_single_instance`]
/// is this with the defaults.
#[must_use = "options do nothing until acquire() or acquire_async() is called"]
pub struct InstanceOptions {
    pub(crate) name: String,
    /// `None`: not chosen in code, so [`SCOPE_ENV`](crate::SCOPE_ENV) or else [`Scope::Auto`].
    pub(crate) scope: Option<Scope>,
    pub(crate) backends: BackendSelection,
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
            .field("backends", &self.backends)
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
    /// every backend that applies (the lock file, and the bus name when a bus is available); no waiting, no replacement; the lock file watched with
    /// inotify, no periodic re-check; `READY=1` sent to systemd once acquired, when it asked
    /// for it.
    pub fn new(name: impl Into<String>) -> Self {
        InstanceOptions {
            name: name.into(),
            scope: None,
            backends: BackendSelection::Auto,
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

    /// Uses `backend` alone to enforce exclusion, instead of every backend that applies (the
    /// lock file always, then the bus name when a bus is available), which is the default.
    ///
    /// With [`Backend::Dbus`] alone, an acquisition fails with [`Error::NoUsableBackend`] when
    /// no bus is configured or reachable.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backends = BackendSelection::Only(backend);
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
    /// does for `postmaster.pid`). Off by default: an idle holder then never wakes up. A removal
    /// the re-check finds that the inotify watch did not see is a loss (never re-created).
    ///
    /// An interval under 10 ms, zero included, is taken as 10 ms (the CLI's shortest
    /// `--recheck`): a shorter timer would keep a CPU busy re-checking. The re-check runs on the
    /// watch's own thread, as the inotify watch does, whatever runtime acquired.
    pub fn recheck_lock_file(mut self, interval: Duration) -> Self {
        self.recheck = Some(interval.max(MIN_RECHECK));
        self
    }

    /// Watches the lock file's directory with inotify and reports
    /// [`LossReason::LockFileRemoved`] / [`LossReason::LockFileReplaced`] /
    /// [`LossReason::LockDirectoryRemoved`] as soon as someone removes or replaces the file or
    /// its directory: no timer, so an idle holder still never wakes up (only a change in the
    /// lock directory wakes it). A lock file it sees removed, and nothing else made at its
    /// path since, is re-created. If inotify cannot be set up (its limits reached), a re-check
    /// every second is used instead, with a `warn` line, and
    /// [`InstanceGuard::lock_file_watched`](crate::InstanceGuard::lock_file_watched) says so. **On by default**; `false` turns
    /// it off (the lock file is then still re-checked when the bus connection closes, before a
    /// loss claims it still excludes). A removal found by a re-check, not seen happen, is a
    /// loss, never re-created: another copy may have made the file, run and left in between.
    ///
    /// The watch is a small thread asleep in `poll`, started with the guard and stopped before
    /// the guard removes its lock file: it needs no runtime, so the guard of
    /// [`InstanceOptions::acquire_async`] stays watched even once its runtime is gone.
    ///
    /// The mount table is watched too (`POLLPRI` on `/proc/self/mountinfo`): a file system
    /// mounted over the lock directory, or over one above it, is seen at once. So is a directory
    /// above it renamed or removed, and a symbolic link on the path made to lead elsewhere: every
    /// directory and link on the way is watched too (the README's "The lock file" says how).
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
    /// The planning errors of [`InstanceOptions::plan`]; [`Error::UnsafeLockPath`] and
    /// [`Error::NotALockFile`] when the lock path names a file an acquisition would refuse (a
    /// symlink or anything else that is not a regular file, never opened; or, held by nobody, a
    /// file with more than one name or one that is not a lock file); [`Error::NotPermitted`] when this process may not open the lock file
    /// (or search its directory); [`Error::Io`] when it cannot be examined otherwise.
    pub fn lock_file_holder(&self) -> Result<Option<Holder>> {
        let plan = self.plan()?;
        match (plan.lock_file, self.resolve()?.2) {
            (Some(path), Some(lock_plan)) => {
                // As `status` does.
                let way = lockfile::refuse_unsafe_way(&lock_plan);
                match (lockfile::holder_of(&path, &plan.name), way) {
                    (Ok(Some(holder)), _) => Ok(Some(holder)),
                    (_, Err(e)) => Err(e),
                    (Ok(None), Ok(())) => {
                        lockfile::refuse_unheld_file(&lock_plan)?;
                        Ok(lockfile::copy_in_the_other_dir_blocking(&lock_plan))
                    }
                    (Err(e), Ok(())) => Err(e),
                }
            }
            _ => Ok(None),
        }
    }
}

pub(crate) fn options_wait(options: &InstanceOptions) -> Duration {
    match options.wait {
        Wait::Timeout(d) => d,
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::InstanceOptions;

    /// A re-check shorter than the shortest interval would keep a CPU busy: it is clamped.
    #[test]
    fn a_recheck_interval_is_at_least_the_shortest() {
        for (given, taken) in [
            (Duration::ZERO, Duration::from_millis(10)),
            (Duration::from_nanos(1), Duration::from_millis(10)),
            (Duration::from_secs(3), Duration::from_secs(3)),
            (Duration::MAX, Duration::MAX),
        ] {
            let options = InstanceOptions::new("org.example.Recheck").recheck_lock_file(given);
            assert_eq!(options.recheck, Some(taken), "given {given:?}");
        }
    }
}
