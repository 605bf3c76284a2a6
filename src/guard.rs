//! The one guard type: proof that this process is the running instance.
//!
//! Over 400 lines: the guard's accessors and its two release paths (blocking and async), which
//! must release in the same order (the bus name, then the lock file), are kept side by side.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dbus::HeldName;
use crate::error::{Error, Result};
use crate::held::{Held, Holding};
use crate::lockfile::{HeldFile, ReleaseReport};
use crate::loss::{Loss, LossLog, LossReason, LossWatcher, LossesRead};
use crate::name::InstanceName;
use crate::recreation::LockFileRecreations;
use crate::runtime::{ServiceThread, block_here};
use crate::scope::{Backend, BusKind, Scope};

/// Proof that this process is the one running instance of a name.
///
/// Dropping it releases the instance: the bus name first, then the lock file, which is removed
/// while still locked. [`InstanceGuard::release`] does the same and reports failures, which
/// `Drop` can only log.
///
/// # Daemonising after acquiring
///
/// Acquire *after* forking: the process that keeps the instance should be the one that
/// acquired it. A child made by `fork` shares the lock file's open file description, and with
/// it the lock, so the instance stays held for as long as either process keeps it open. Only
/// the acquiring process removes the lock file and releases the bus name: a guard dropped (or
/// released) in a forked child closes the child's own descriptors and leaves the file, the lock,
/// the name and its connection alone (the child keeps its copy of the connection's socket until
/// it exits or executes a program). The other way round, a guard dropped (or released) in the
/// acquiring parent while a forked child still holds the lock leaves the lock file where it is
/// (release first checks, with a fresh open file description, that nobody else holds the lock):
/// other copies are refused until the child closes it, though the record still names the parent
/// ("holder unknown" once it is gone). The parent's release does release the bus name, which
/// belongs to its connection: a parent that forks the process which keeps a bus name must not
/// let its own guard's destructor run (leave with [`std::process::exit`], or
/// [`std::mem::forget`] the guard).
#[must_use = "the instance is released as soon as the guard is dropped"]
pub struct InstanceGuard {
    name: InstanceName,
    scope: Scope,
    /// What is held, backend by backend, in the order of acquisition.
    held: Holding,
    losses: watch::Receiver<Vec<Loss>>,
    /// Keeps the loss channel open for as long as the guard lives, even with no task feeding it;
    /// closed by its release (see [`InstanceGuard::close_losses`]), so that watchers see its end
    /// once the guard is gone, whatever became of the tasks that report to it.
    loss_log: LossLog,
    seen_losses: usize,
    /// How many losses, oldest first, the program has been given (by this guard or any of its
    /// [`LossWatcher`]s): a release with a loss past them was never heard of, and is not clean.
    losses_read: LossesRead,
    tasks: Vec<JoinHandle<()>>,
    /// The runtime that services the connection when the guard came from the blocking API (set
    /// by it once acquired: the only field set outside `InstanceGuard::new`).
    pub(crate) runtime: Option<ServiceThread>,
    /// The process that acquired the instance: the only one that releases it (see "Daemonising
    /// after acquiring").
    pid: u32,
}

impl fmt::Debug for InstanceGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceGuard")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("lock_file", &self.lock_file())
            .field("bus", &self.bus_kind())
            .field("bus_unique_name", &self.bus_unique_name())
            .field("backends", &self.backends())
            .finish()
    }
}

/// What an acquisition holds, handed to [`InstanceGuard::new`].
pub(crate) struct GuardParts {
    pub(crate) name: InstanceName,
    /// The scope in effect (never [`Scope::Auto`]).
    pub(crate) scope: Scope,
    /// What is held, in the order of acquisition.
    pub(crate) held: Holding,
    /// The loss channel: the log its watchers feed, and the guard's end of it.
    pub(crate) loss_log: LossLog,
    pub(crate) losses: watch::Receiver<Vec<Loss>>,
    /// The tasks that watch for losses, aborted on release.
    pub(crate) tasks: Vec<JoinHandle<()>>,
}

impl InstanceGuard {
    /// The guard over what was acquired; it has no service thread yet (the blocking API gives
    /// it one).
    pub(crate) fn new(parts: GuardParts) -> Self {
        let GuardParts {
            name,
            scope,
            held,
            loss_log,
            losses,
            tasks,
        } = parts;
        InstanceGuard {
            name,
            scope,
            held,
            losses,
            loss_log,
            seen_losses: 0,
            losses_read: LossesRead::default(),
            tasks,
            runtime: None,
            pid: std::process::id(),
        }
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The scope in effect: [`Scope::User`] or [`Scope::System`], never [`Scope::Auto`] (which
    /// is resolved as [`crate::InstanceOptions::plan`] documents), whether it was chosen in code
    /// or through [`crate::SCOPE_ENV`].
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The backends that hold the instance, in the order they were acquired (the lock file
    /// first).
    pub fn backends(&self) -> Vec<Backend> {
        self.held.iter().map(Held::backend).collect()
    }

    /// The lock file held, if any.
    pub fn lock_file(&self) -> Option<&Path> {
        self.held.lock_file().map(|file| file.lock().path())
    }

    /// The descriptor of the lock file held, if any: whoever holds a duplicate of it holds the
    /// instance too.
    ///
    /// The lock is an open-file-description lock, so it belongs to the open file, not to this
    /// process: a duplicate (`dup`, `fcntl(F_DUPFD)`, or inherited across `fork` and `exec`)
    /// shares it, and the kernel releases the lock only when the last descriptor of that open
    /// file is closed. `unique-instance run` hands one duplicate to COMMAND on purpose, so that a
    /// COMMAND which outlives the wrapper (a privilege-dropping launcher clears
    /// `PR_SET_PDEATHSIG`) keeps other copies out until it is gone.
    ///
    /// The descriptor is close-on-exec; leave it so, and make any duplicate deliberately.
    ///
    /// # Caveats
    ///
    /// A duplicate that outlives the guard keeps the lock held after [`InstanceGuard::release`]
    /// or `Drop`, which then find the lock still held by someone else and leave the file in
    /// place (with this process's record): other copies are refused until whoever kept the
    /// duplicate closes it, and the file is left behind. Give a duplicate only to processes that
    /// end before the guard is released (`run` stops every process COMMAND left behind before it
    /// releases). Whoever holds a duplicate may also write the holder record.
    ///
    /// A lock file that someone removed is re-created by the guard (see
    /// [`crate::LossReason::LockFileRemoved`]): from then on this descriptor — the same number,
    /// never closed while the guard lives — refers to the new file, and a duplicate made before
    /// keeps only the removed file, which no longer keeps other copies out.
    /// [`InstanceGuard::lock_file_recreations`] says when to make a new one. Since the file
    /// behind the descriptor may change at any moment, duplicate it first and look only at the
    /// duplicate (`fstat` it, send it): two calls on the descriptor itself may see two files.
    pub fn lock_file_descriptor(&self) -> Option<BorrowedFd<'_>> {
        self.held.lock_file().map(|file| file.lock().as_fd())
    }

    /// The inotify instance that watches the lock file's path, if any, for a process the lock is
    /// handed to (see [`InstanceGuard::lock_file_descriptor`]): `unique-instance run` hands a
    /// duplicate to its keeper, with the lock's, and the keeper keeps the lock file with it
    /// ([`HandedLockFile::with_watch`](crate::HandedLockFile::with_watch)) once this process is
    /// gone.
    ///
    /// Its queue holds what happened at the path that this process's watch has not read yet:
    /// the events of a time it was stopped (SIGSTOP, a debugger) or slow. A process given a
    /// duplicate reads them once this one is gone, and so learns of a change this one never
    /// saw (its lock file moved away and back while another copy ran, say), which a new
    /// instance, made only then, would never show. What this process read but had not acted on
    /// when it died is not in the queue any more (see `HandedLockFile::with_watch`).
    ///
    /// `None` without a lock file, with [`InstanceOptions::watch_lock_file`] off, or when the
    /// acquisition could not watch the lock directory with inotify (see
    /// [`InstanceGuard::lock_file_watched`]).
    ///
    /// The descriptor is close-on-exec; leave it so, and make any duplicate deliberately.
    ///
    /// # Caveats
    ///
    /// Never read from it while this process lives, nor add or remove watches: the events are
    /// this process's watch's, and an event taken is one it never sees (a removal it would have
    /// undone, a loss it would have reported). A duplicate is only for reading once this
    /// process is gone.
    ///
    /// [`InstanceOptions::watch_lock_file`]: crate::InstanceOptions::watch_lock_file
    pub fn lock_file_watch_descriptor(&self) -> Option<BorrowedFd<'_>> {
        self.held.lock_file().and_then(HeldFile::watch_instance)
    }

    /// Whether changes at the lock file's path are seen as they happen (inotify), so that a
    /// removed lock file is re-created at once and a path made to lead elsewhere is reported at
    /// once. False without a lock file, with [`InstanceOptions::watch_lock_file`] off, or when
    /// inotify could not be set up (its per-user limits, `fs.inotify.max_user_instances` and
    /// `max_user_watches`, reached): the path is then only re-checked, every second or as
    /// [`InstanceOptions::recheck_lock_file`] asks, and a removal found so is a loss, not undone
    /// — meanwhile another copy may have run. `unique-instance run` warns then.
    ///
    /// [`InstanceOptions::watch_lock_file`]: crate::InstanceOptions::watch_lock_file
    /// [`InstanceOptions::recheck_lock_file`]: crate::InstanceOptions::recheck_lock_file
    pub fn lock_file_watched(&self) -> bool {
        self.held.lock_file().is_some_and(HeldFile::watched)
    }

    /// Tells each time, from now on, that the lock file was re-created after someone removed it
    /// (see [`LockFileRecreations`]), so that a program which gave a duplicate of
    /// [`InstanceGuard::lock_file_descriptor`] to another process can hand it one of the new
    /// file: `unique-instance run` does so for the process that outlives it to stop COMMAND's
    /// tree. Its end (`None`) comes once the lock file is released; at once for a guard that
    /// holds none.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = unique_instance::InstanceOptions::new("org.example.Server")
    ///     .acquire_async()
    ///     .await?;
    /// let mut recreations = guard.lock_file_recreations();
    /// while recreations.next().await.is_some() {
    ///     if let Some(lock) = guard.lock_file_descriptor() {
    ///         // Duplicated first: what is sent is what was looked at.
    ///         let new_file = lock.try_clone_to_owned()?;
    ///         // ... hand `new_file` to the process that holds a duplicate of the old one ...
    ///         # drop(new_file);
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn lock_file_recreations(&self) -> LockFileRecreations {
        self.held
            .lock_file()
            .map_or_else(LockFileRecreations::none, |file| {
                LockFileRecreations::new(file.lock().recreations())
            })
    }

    /// The descriptor of the socket of the bus connection that owns the name, when this library
    /// made that socket (a bus address naming a Unix socket, as session and system buses do);
    /// `None` without a bus name, or on a transport other than a Unix socket (TCP, for one).
    ///
    /// The bus drops a connection, and with it the names it owns, only once the connection's
    /// socket is closed, and a socket is closed only with its last descriptor. So whoever holds a
    /// duplicate of this descriptor keeps the name owned, even after this process is gone:
    /// `unique-instance run` hands one to its keeper process, so that the name stays owned until
    /// every process COMMAND started is gone. [`InstanceGuard::release`], dropping the guard and
    /// [`InstanceGuard::release_async`] still release the name (`ReleaseName`, or by shutting the
    /// socket down, which ends the connection for every duplicate).
    ///
    /// The descriptor is close-on-exec; leave it so, and make any duplicate deliberately.
    ///
    /// # Caveats
    ///
    /// Never read from it or write to it: the byte stream belongs to this process's connection,
    /// and a byte taken or added breaks it. A duplicate is only for keeping the connection open.
    ///
    /// Once this process is gone, nobody reads what the bus sends to the connection. The
    /// guard's connection subscribes to no signal (no match rule), so that is only what is
    /// addressed to it: `NameLost`/`NameAcquired` when the name changes hands, and method calls
    /// other programs make to the name, which then get no answer. The bus queues them up to its
    /// limit for one connection; then dbus-daemon refuses further messages to it
    /// (`LimitsExceeded`, `max_outgoing_bytes`), and dbus-broker refuses calls to it but drops the
    /// connection, and with it the name, when a message from the bus itself does not fit.
    pub fn bus_socket_descriptor(&self) -> Option<BorrowedFd<'_>> {
        self.held.name().and_then(HeldName::socket)
    }

    /// The bus the name is owned on, if any.
    pub fn bus_kind(&self) -> Option<BusKind> {
        self.held.name().map(HeldName::kind)
    }

    /// Our unique name on the bus (`:1.42`), if the name is owned on a bus.
    pub fn bus_unique_name(&self) -> Option<String> {
        self.held
            .name()
            .and_then(|b| b.connection().unique_name().map(|n| n.to_string()))
    }

    /// The connection that owns the name: serve your own objects on it.
    ///
    /// # Caveats
    ///
    /// The connection belongs to the instance: a blocking release (`drop`, [`release`]) ends
    /// it, clones included, so that the bus has dropped the name before the lock file is
    /// freed, whatever runtime the release runs in. [`release_async`] leaves it to close with
    /// its last handle after `ReleaseName` was answered, when it runs on the runtime that
    /// acquired (or that runtime is multi-threaded); on another it ends it too, since the
    /// acquiring runtime, maybe idle, would read no answer.
    ///
    /// [`release`]: InstanceGuard::release
    /// [`release_async`]: InstanceGuard::release_async
    pub fn connection(&self) -> Option<&zbus::Connection> {
        self.held.name().map(HeldName::connection)
    }

    /// Tells systemd this service is ready: `READY=1` and a `STATUS=` line naming the instance,
    /// when `NOTIFY_SOCKET` is set (a `Type=notify` unit); nothing otherwise. For programs that
    /// turned [`crate::InstanceOptions::notify_ready`] off to finish their own setup first.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when the notification socket cannot be reached.
    pub fn notify_ready(&self) -> Result<()> {
        crate::notify::ready(&self.acquired())
    }

    /// What systemd's status line says of this instance.
    pub(crate) fn acquired(&self) -> crate::notify::Acquired<'_> {
        crate::notify::Acquired {
            name: self.name(),
            lock_file: self.lock_file(),
            bus: self.bus_kind(),
        }
    }

    /// Every loss seen so far, oldest first.
    pub fn losses(&self) -> Vec<Loss> {
        let losses = self.losses.borrow().clone();
        self.losses_read.up_to(losses.len());
        losses
    }

    /// False once a loss left no backend excluding other copies.
    ///
    /// In a child made by `fork` after the acquisition, nothing watches for losses (threads
    /// and tasks are not forked): there it is looked at on each call instead, and true only
    /// while the lock file is still held and its path still leads to it (a guard with no lock
    /// file cannot tell there, and says false). See the README, "Daemonising after acquiring".
    pub fn is_exclusive(&self) -> bool {
        if std::process::id() != self.pid {
            // Not even the loss log is read: the watch thread, which is not here, may have held
            // its lock at the fork. What is looked at now is the answer.
            return self
                .held
                .lock_file()
                .is_some_and(HeldFile::held_now_without_shared_state);
        }
        let losses = self.losses.borrow();
        self.losses_read.up_to(losses.len());
        losses.iter().all(|l| l.still_exclusive)
    }

    /// A watcher of this guard's losses that can be moved to another thread or task, so one
    /// part of a program waits for losses while another holds the guard. It starts before the
    /// first loss not yet returned by [`InstanceGuard::next_loss`].
    pub fn loss_watcher(&self) -> LossWatcher {
        LossWatcher::new(
            self.losses.clone(),
            self.seen_losses,
            self.losses_read.clone(),
        )
    }

    /// Waits for the next loss event not yet returned by this method.
    ///
    /// Never resolves when nothing can be lost: a lock file alone, with its watch turned off
    /// ([`crate::InstanceOptions::watch_lock_file`]) and no re-check configured.
    pub async fn next_loss(&mut self) -> Loss {
        let seen = self.seen_losses;
        let log = self
            .losses
            .wait_for(|log| log.len() > seen)
            .await
            .map(|log| log[seen]);
        match log {
            Ok(loss) => {
                self.seen_losses += 1;
                self.losses_read.up_to(self.seen_losses);
                loss
            }
            // The sender lives in the guard's tasks; if they are all gone nothing more can be
            // reported, so wait forever, as documented.
            Err(_) => std::future::pending().await,
        }
    }

    /// Blocking form of [`InstanceGuard::next_loss`], giving up after `timeout`. It needs no
    /// runtime and works anywhere, inside a runtime too.
    ///
    /// # Caveats
    ///
    /// As [`LossWatcher::next_blocking`]: it blocks the calling thread.
    pub fn wait_next_loss(&mut self, timeout: Option<Duration>) -> Option<Loss> {
        block_here(self.next_loss(), timeout)
    }

    /// Releases the instance and reports any failure (the bus name first, then the lock file).
    ///
    /// # Errors
    ///
    /// [`Error::Bus`](crate::Error::Bus) if `ReleaseName` failed, [`Error::Io`](crate::Error::Io)
    /// if the lock file could not be removed, [`Error::LostBeforeRelease`] if the instance had
    /// been lost before the release and the program not told: the lock file had stopped being
    /// ours without any loss reported (this copy was stopped, or its watch was off, while the
    /// file went), or a loss that left nothing excluding other copies was reported but none
    /// such was ever returned by this guard or its [`LossWatcher`]s (nor seen in
    /// [`InstanceGuard::losses`] or [`InstanceGuard::is_exclusive`]). The instance is released in any case:
    /// closing our descriptors releases it.
    ///
    /// # Caveats
    ///
    /// From inside a single-threaded tokio runtime this cannot wait for the bus, so it closes the
    /// connection instead (the bus releases the name when it sees the close). Use
    /// [`InstanceGuard::release_async`] there.
    pub fn release(mut self) -> Result<()> {
        self.release_blocking()
    }

    /// Releases the instance from async code, reporting any failure. On a runtime other than
    /// the current-thread one that acquired, whose tasks may not run meanwhile, the bus
    /// connection is ended instead of asking the bus to release the name (see
    /// [`InstanceGuard::connection`]).
    ///
    /// # Errors
    ///
    /// As [`InstanceGuard::release`].
    pub async fn release_async(mut self) -> Result<()> {
        self.leave_service_thread_in_a_child();
        self.stop_tasks();
        let report = self.release_report();
        let result = self.held.release(self.name.as_str()).await;
        // Ends the service thread, if any, and with it the connection's tasks.
        self.runtime.take();
        result.and_then(|name_lost| self.close_losses(report, name_lost))
    }

    fn release_report(&self) -> Option<ReleaseReport> {
        self.held.lock_file().map(HeldFile::release_report)
    }

    /// Ends the loss log once everything is released: no task or thread records a loss in it
    /// any more (an aborted task may still hold it, on a runtime that does not run now), and
    /// every [`LossWatcher`] ends once it returned what was recorded before. A loss the release
    /// found, or recorded before the log was closed and never read, is checked last (see
    /// [`InstanceGuard::lost_before_release`]), so none recorded is missed or comes after the end.
    ///
    /// `name_lost`: how the bus name had stopped being ours, found by the release itself (the
    /// bus's answer to `ReleaseName`, or a connection the bus had closed already): a loss too
    /// unless the lock file still excluded other copies.
    fn close_losses(
        &self,
        report: Option<ReleaseReport>,
        name_lost: Option<LossReason>,
    ) -> Result<()> {
        // Only the acquiring process checks at release; and in a forked child the log's lock, or
        // the shared state's, may have been held by the watch thread at the fork, a thread the
        // child does not have: taking it would wait for ever.
        if std::process::id() != self.pid {
            return Ok(());
        }
        let Some(log) = self.loss_log.close() else {
            // Closed by an earlier release (this is the drop after it).
            return Ok(());
        };
        self.lost_before_release(report, name_lost, &log)
    }

    /// A loss that the release found and nothing had reported (see
    /// [`Error::LostBeforeRelease`]): recorded as a loss in `log`, and returned as an error, so
    /// that a program never takes such a release for a clean one.
    fn lost_before_release(
        &self,
        report: Option<ReleaseReport>,
        name_lost: Option<LossReason>,
        log: &watch::Sender<Vec<Loss>>,
    ) -> Result<()> {
        // A loss recorded that left nothing excluding other copies, while the program was never
        // given one (it came as the program decided to release, or the program never looks):
        // a release is no clean end then either. A program told once that exclusion was gone
        // knows; later losses add nothing.
        let unread = {
            let log = self.losses.borrow();
            let (read, unread) = log.split_at(self.losses_read.count().min(log.len()));
            if read.iter().any(|l| !l.still_exclusive) {
                None
            } else {
                unread.iter().find(|l| !l.still_exclusive).copied()
            }
        };
        if let Some(loss) = unread {
            return Err(Error::LostBeforeRelease {
                name: self.name.to_string(),
                reason: loss.reason,
            });
        }
        // The lock file lost unseen; else the name: taken over (a replacement is the end of
        // this copy's turn, as the watch reports it), or gone with its connection when no lock
        // file of ours excluded other copies meanwhile (none held, or it was lost too).
        let lock_file_held = report.as_ref().is_some_and(ReleaseReport::ours_to_the_end);
        let lost = report.and_then(|r| r.lost_unnoticed());
        let name_lost = name_lost.filter(|r| *r == LossReason::Replaced || !lock_file_held);
        let Some(reason) = lost.or(name_lost) else {
            return Ok(());
        };
        if self.losses.borrow().iter().any(|l| !l.still_exclusive) {
            // The program was told already.
            return Ok(());
        }
        log.send_modify(|losses| {
            losses.push(Loss {
                reason,
                still_exclusive: false,
            })
        });
        Err(Error::LostBeforeRelease {
            name: self.name.to_string(),
            reason,
        })
    }

    /// In a child after `fork`, the service thread and its runtime's tasks exist only in the
    /// process that acquired, and nothing runs them here: stopping them would take that
    /// runtime's locks, which a thread of the parent may have held at the fork, and wait for a
    /// thread that never answers. They are left as they are (a little memory).
    fn leave_service_thread_in_a_child(&mut self) {
        if std::process::id() != self.pid
            && let Some(service) = self.runtime.take()
        {
            std::mem::forget(service);
            std::mem::forget(std::mem::take(&mut self.tasks));
        }
    }

    fn stop_tasks(&mut self) {
        // Stopped before anything is released, so that our own release is not reported as a
        // loss (the lock file's watch thread, if any, stops with its part: see `HeldFile`).
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// Releases without awaiting anything, from any thread, inside a runtime or not: the bus
    /// name first (through the guard's service thread when it has one, else by ending the
    /// connection and waiting until the bus closed it), then the lock file.
    fn release_blocking(&mut self) -> Result<()> {
        self.leave_service_thread_in_a_child();
        self.stop_tasks();
        let service = self
            .runtime
            .as_ref()
            .filter(|s| !s.is_current_thread())
            .map(ServiceThread::handle);
        let report = self.release_report();
        let result = self.held.release_blocking(service, self.name.as_str());
        // Ends the service thread, if any, and with it the connection's tasks.
        self.runtime.take();
        result.and_then(|name_lost| self.close_losses(report, name_lost))
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release_blocking() {
            tracing::warn!(name = %self.name, error = %e, "releasing the instance failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::tests::PrivateBus;
    use crate::error::Error;

    /// A guard whose service thread died (its runtime is gone) does not report its release as a
    /// success, and still frees the name.
    #[test]
    fn release_reports_a_dead_service_thread() {
        let bus = PrivateBus::start();
        let name = "org.uniqueinstance.Unit.DeadServiceThread";
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connected = rt.block_on(bus.connect(Some(name)));
        let handle = rt.handle().clone();
        let (stop, _stopped) = tokio::sync::oneshot::channel();
        // What a panic on the service thread leaves: a handle to a runtime that is gone.
        drop(rt);
        let (loss_tx, loss_rx) = LossLog::new();
        let mut guard = InstanceGuard::new(GuardParts {
            name: InstanceName::new(name).expect("name"),
            scope: Scope::User,
            held: {
                let mut held = Holding::default();
                held.push(Held::Name(HeldName::new(
                    BusKind::Session,
                    connected.conn,
                    connected.disconnect,
                    false,
                )));
                held
            },
            loss_log: loss_tx,
            losses: loss_rx,
            tasks: Vec::new(),
        });
        guard.runtime = Some(ServiceThread::from_parts(
            handle,
            stop,
            std::thread::spawn(|| ()).thread().id(),
        ));
        let result = guard.release();
        assert!(
            matches!(result, Err(Error::Bus { .. })),
            "a dead service thread reported as a release: {result:?}"
        );
        let checker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert!(!checker.block_on(bus.has_owner(name)));
    }
}
