//! Acquiring an instance, blocking or async: the plan resolved, then its steps walked in order
//! (`steps`: the lock file, then the bus name, each step a file of its own), the watches
//! started, the guard built. The blocking API runs the same walk on a small runtime of its
//! own, except for a lock file alone with no wait, which needs none.
//! It must not speak a backend's protocol (that is `lockfile` and `dbus`) nor plan (`plan`).

mod bus;
mod lock_file;
mod steps;

use crate::loss::LossLog;

use crate::error::{Error, Result, already_running};
use crate::guard::{GuardParts, InstanceGuard};
use crate::held::{Held, Holding};
use crate::lockfile::{self, Attempt, HeldFile};
use crate::options::{InstanceOptions, Wait};
use crate::plan::{self, LockPlan, effective_scope};
use crate::runtime::ServiceThread;
use crate::scope::{Backend, BackendSelection};

impl InstanceOptions {
    /// A lock file alone with no wait needs no runtime (its watch, as every guard's, is a
    /// plain thread: see `LockWatchThread`).
    fn needs_runtime(&self) -> bool {
        self.backends != BackendSelection::Only(Backend::LockFile) || self.wait != Wait::No
    }

    /// Acquires the instance, blocking; for plain `fn main`. The guard carries a small runtime
    /// that keeps its bus connection serviced, so loss of the name is noticed.
    ///
    /// It works inside a tokio runtime too (in `block_on` or in a task, of either flavor): the
    /// acquisition then runs on the guard's own thread while this one waits, because a runtime
    /// cannot be started on a thread that is already running one.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRunning`] when another copy holds it; [`Error::TimedOut`] when a bounded
    /// wait ran out; [`Error::InvalidName`], [`Error::NotPermitted`], [`Error::NoUsableBackend`],
    /// [`Error::UnsafeLockPath`], [`Error::NetworkFilesystem`], [`Error::Io`], [`Error::Bus`],
    /// [`Error::Runtime`].
    ///
    /// # Caveats
    ///
    /// Inside a runtime it blocks the calling thread until it is decided (with a wait, that may
    /// be long): in async code prefer [`InstanceOptions::acquire_async`].
    pub fn acquire(self) -> Result<InstanceGuard> {
        if !self.needs_runtime() {
            // A lock file alone, no waiting: no runtime (the watch, on by default, is
            // a thread asleep in `poll`).
            let notify = self.notify_ready;
            return tell_service_manager(notify, acquire_lock_only(self));
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            return self.acquire_on_service_thread();
        }
        // Acquired on this thread, with a current-thread runtime: every reply is read here, with
        // no wake-ups of another thread (a multi-thread runtime made acquire() ~2x slower,
        // benchmark 1). Then a thread of its own drives that runtime for as long as the guard
        // lives, so the connection stays serviced.
        let name = self.name.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::runtime("cannot start the runtime for", &name, e))?;
        let mut guard = rt.block_on(self.acquire_async())?;
        match ServiceThread::start(rt) {
            Ok(service) => {
                guard.runtime = Some(service);
                Ok(guard)
            }
            Err((rt, e)) => {
                // Released while this thread can still drive the connection.
                let _ = rt.block_on(guard.release_async());
                Err(Error::runtime(
                    "cannot start the thread that services",
                    &name,
                    e,
                ))
            }
        }
    }

    /// [`InstanceOptions::acquire`] from a thread that runs a runtime already: the guard's own
    /// thread starts the runtime, acquires on it and then services the connection, while this
    /// thread waits for the outcome on a plain channel.
    fn acquire_on_service_thread(self) -> Result<InstanceGuard> {
        let name = self.name.clone();
        let (outcome_tx, outcome_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name("unique-instance".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = outcome_tx.send(Err(Error::runtime(
                            "cannot start the runtime for",
                            &thread_name,
                            e,
                        )));
                        return;
                    }
                };
                let outcome = rt
                    .block_on(self.acquire_async())
                    .map(|guard| (guard, rt.handle().clone()));
                let acquired = outcome.is_ok();
                // If the caller is gone, the guard comes back here and is dropped: released.
                if outcome_tx.send(outcome).is_ok() && acquired {
                    // Serviced until the guard drops its sender.
                    let _ = rt.block_on(stopped);
                }
                rt.shutdown_background();
            })
            .map_err(|e| Error::runtime("cannot start the thread that acquires", &name, e))?;
        match outcome_rx.recv() {
            Ok(Ok((mut guard, handle))) => {
                let thread = thread.thread().id();
                guard.runtime = Some(ServiceThread::from_parts(handle, stop, thread));
                Ok(guard)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::runtime(
                "the thread that acquires ended without an answer for",
                &name,
                std::io::Error::other("the acquiring thread panicked"),
            )),
        }
    }

    /// Acquires the instance inside a tokio runtime.
    ///
    /// The lock file's watch (and its re-check) is a thread of the library's own, not a task:
    /// the lock file stays watched, and a removed one re-created, whatever the program does with
    /// this runtime afterwards (drops it, or never runs it again). The bus name's watch is a task
    /// on this runtime, as are zbus's own tasks for the connection: the name stays ours while
    /// the guard keeps the connection open, but its loss (a replacement, the bus going away) is
    /// noticed only while this runtime runs.
    ///
    /// # Errors
    ///
    /// As [`InstanceOptions::acquire`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or in one built without its I/O and time drivers
    /// (`Builder::enable_all`, which `#[tokio::main]` calls): zbus and the waits need both, and
    /// tokio panics where they are missing. [`InstanceOptions::acquire`] starts a runtime of
    /// its own.
    pub async fn acquire_async(self) -> Result<InstanceGuard> {
        let notify = self.notify_ready;
        tell_service_manager(notify, self.acquire_core().await)
    }

    /// Resolves the plan, then walks its steps (see `steps`).
    async fn acquire_core(self) -> Result<InstanceGuard> {
        let (name, scope, lock_plan, bus_plan) = self.resolve()?;
        let scope = effective_scope(scope, lock_plan.as_ref(), bus_plan.as_ref());
        tracing::debug!(
            name = %name,
            scope = ?scope,
            backends = ?self.backends,
            lock_file = ?lock_plan.as_ref().map(LockPlan::path),
            bus = ?bus_plan,
            "acquiring instance"
        );
        steps::walk(self, name, scope, plan::steps(lock_plan, bus_plan)).await
    }
}

/// Tells systemd how the attempt went (see [`crate::notify::outcome`]) unless the program opted
/// out, and returns the outcome unchanged.
fn tell_service_manager(notify: bool, outcome: Result<InstanceGuard>) -> Result<InstanceGuard> {
    if notify {
        crate::notify::outcome(outcome.as_ref().map(InstanceGuard::acquired));
    }
    outcome
}

fn acquire_lock_only(options: InstanceOptions) -> Result<InstanceGuard> {
    let (name, scope, lock_plan, _) = options.resolve()?;
    let plan = lock_plan.expect("the lock-file backend always plans a lock file");
    let scope = effective_scope(scope, Some(&plan), None);
    // Made before the lock: see `HeldLock::move_above`.
    let inotify = options.watch_lock.then(lockfile::new_inotify);
    let mut dir = lockfile::open_dir(&plan, options.allow_network_filesystem)?;
    let held = match lockfile::lock(&plan, &mut dir, false)? {
        Attempt::Acquired(held, _) => held,
        Attempt::Busy(holder) => return Err(already_running(&name, holder)),
        Attempt::KeptOut => return Err(lockfile::read_locked(&plan, &plan.path())),
    };
    // As `lock_file::acquire` does (no wait here): a copy in the other system directory.
    if let Some(holder) = lockfile::copy_in_the_other_dir_blocking(&plan) {
        return Err(already_running(&name, Box::new(holder)));
    }
    let mut file = HeldFile::new(held, inotify, None)?;
    let (loss_tx, loss_rx) = LossLog::new();
    file.start_watch(options.recheck, &loss_tx)?;
    let mut held = Holding::default();
    held.push(Held::LockFile(file));
    Ok(InstanceGuard::new(GuardParts {
        name,
        scope,
        held,
        loss_log: loss_tx,
        losses: loss_rx,
        tasks: Vec::new(),
    }))
}
