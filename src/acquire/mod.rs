//! Acquiring an instance: the backends composed in order (the lock file, then the bus name),
//! the record completed, the loss watchers started, the guard built; blocking or async.
//! It must not speak a backend's protocol (that is `lockfile` and `dbus`) nor plan (`plan`).
//!
//! Over 400 lines: `acquire_core` is the one sequence of the acquisition, read top to bottom.

use std::time::Instant;

use tokio::sync::watch;

use crate::dbus::{self, HeldName, own_name, request_flags, watch_bus};
use crate::error::{Error, Result, already_running};
use crate::guard::{GuardParts, InstanceGuard};
use crate::lockfile::{self, Attempt, HeldLock, LockRecord, LockWatchThread, try_lock, wait_lock};
use crate::options::{InstanceOptions, Wait, options_wait};
use crate::plan::{LockPlan, effective_scope};
use crate::runtime::ServiceThread;
use crate::scope::{Backend, BackendSelection};
use crate::test_hooks::Hook;

impl InstanceOptions {
    /// A lock file alone with no wait and no timer needs no runtime; its watch, if any, is a
    /// plain thread (see `LockWatchThread`).
    fn needs_runtime(&self) -> bool {
        self.backends != BackendSelection::Only(Backend::LockFile)
            || self.recheck.is_some()
            || self.wait != Wait::No
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
            // A lock file alone, no waiting, no timer: no runtime (the watch, on by default, is
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
    /// # Errors
    ///
    /// As [`InstanceOptions::acquire`].
    pub async fn acquire_async(self) -> Result<InstanceGuard> {
        let notify = self.notify_ready;
        tell_service_manager(notify, self.acquire_core().await)
    }

    async fn acquire_core(mut self) -> Result<InstanceGuard> {
        let (name, scope, lock_plan, bus_plan) = self.resolve()?;
        let scope = effective_scope(scope, lock_plan.as_ref(), bus_plan.as_ref());
        let started = Instant::now();
        let deadline = match self.wait {
            Wait::Timeout(d) => Some(started + d),
            _ => None,
        };
        tracing::debug!(
            name = %name,
            scope = ?scope,
            backends = ?self.backends,
            lock_file = ?lock_plan.as_ref().map(LockPlan::path),
            bus = ?bus_plan,
            "acquiring instance"
        );

        // Made before the lock and the bus socket so that a killed holder releases both before
        // it (see `HeldLock::move_above`).
        let inotify = (self.watch_lock && lock_plan.is_some()).then(lockfile::new_inotify);

        // 1. The lock file: cheap, local, and the ground truth on this machine. The record is
        // written at once, so that copies refused meanwhile can name us without waiting for our
        // bus connection; it is completed with the bus below.
        let mut early_bus = None;
        let mut wait_watch = None;
        let (mut lock, previous) = match &lock_plan {
            Some(plan) => {
                let allow_network_fs = self.allow_network_filesystem;
                let (mut held, previous) = match try_lock(plan, allow_network_fs).await? {
                    (Attempt::Acquired(held, previous), _) => (held, previous),
                    (Attempt::Busy(holder), _) if self.wait == Wait::No => {
                        return Err(already_running(&name, holder));
                    }
                    (Attempt::Busy(holder), dir) => {
                        let (notify, timeout) = (self.notify_ready, options_wait(&self));
                        let waited = wait_lock(&name, plan, dir, holder, notify, deadline, timeout);
                        let waited = match &bus_plan {
                            // Connected meanwhile (the name is asked for only once the lock file
                            // is ours), so that a take-over is one round trip from the bus name.
                            // Not with objects to serve: they can go to one connection only, and
                            // this one may have to be replaced if the bus restarts meanwhile.
                            Some(bus) if self.exports.is_empty() => {
                                let mut connect =
                                    std::pin::pin!(dbus::connect(bus.kind, Vec::new(), None));
                                let mut waited = std::pin::pin!(waited);
                                let mut connected = None;
                                // The wait decides: once it ends (acquired, timed out, failed),
                                // a connection still on its way is not waited for unless the
                                // lock file is ours (a slow bus must not stretch a timeout).
                                let waited = loop {
                                    tokio::select! {
                                        waited = &mut waited => break waited?,
                                        c = &mut connect, if connected.is_none() => {
                                            connected = Some(c);
                                        }
                                    }
                                };
                                early_bus = match connected {
                                    Some(connected) => connected.ok(),
                                    None => connect.await.ok(),
                                };
                                waited
                            }
                            _ => waited.await?,
                        };
                        let (held, previous, watch) = waited;
                        wait_watch = watch;
                        (held, previous)
                    }
                };
                let record = LockRecord::for_self(vec![Backend::LockFile], None, None);
                held.write_record(&record)?;
                (Some((held, record)), previous)
            }
            None => (None, None),
        };

        // 2. The bus name.
        let mut bus = None;
        if let Some(plan) = bus_plan {
            let flags = request_flags(self.wait, self.allow_replacement);
            let connected = match early_bus {
                // A connection made while waiting, unless the bus dropped it meanwhile.
                Some(connected) if !connected.conn.is_closed() => Ok(connected),
                _ => {
                    let exports = std::mem::take(&mut self.exports);
                    // Sent with the handshake, unless a test is to stop us before it is sent.
                    let request =
                        (!Hook::BeforeRequestName.armed()).then_some((name.as_str(), flags));
                    dbus::connect(plan.kind, exports, request).await
                }
            };
            match connected {
                Ok(connected) => bus = Some((plan.kind, connected)),
                // Only what we asked it to serve can fail this way (an invalid object path, an
                // interface given twice): a mistake to report, not an unreachable bus.
                Err(e @ (zbus::Error::InterfaceExists(..) | zbus::Error::InvalidObjectPath)) => {
                    return Err(Error::Bus {
                        context: "cannot export an object",
                        bus: plan.kind,
                        source: e,
                    });
                }
                Err(e) if lock.is_none() => {
                    return Err(Error::NoUsableBackend {
                        name: name.to_string(),
                        reason: format!("cannot reach the {} bus ({})", plan.kind, plan.why),
                        source: Some(Box::new(e)),
                    });
                }
                Err(e) => tracing::warn!(
                    name = %name,
                    bus = %plan.kind,
                    error = %e,
                    "the {} bus is unreachable; the lock file alone enforces exclusion",
                    plan.kind
                ),
            }
        } else if lock.is_some() && self.backends == BackendSelection::Auto {
            tracing::warn!(
                name = %name,
                "no D-Bus bus is configured; the lock file alone enforces exclusion"
            );
        }

        if let (Some((held, record)), Some((kind, connected))) = (&mut lock, &bus) {
            record.backend.push(Backend::Dbus);
            record.bus = Some(*kind);
            record.bus_unique_name = connected.conn.unique_name().map(|n| n.to_string());
            held.write_record(record)?;
        }
        let mut lock = lock.map(|(held, _)| held);

        let (loss_tx, loss_rx) = watch::channel(Vec::new());
        let mut tasks = Vec::new();
        let bus = match bus {
            Some((kind, connected)) => {
                // Dropped with this future if it is cancelled, or on an error below: the bus then
                // drops the name or our place in its queue at once, whatever runs the runtime.
                let dbus::Connected {
                    conn,
                    stream,
                    pending_request,
                    disconnect,
                } = connected;
                let owned = own_name(
                    &name,
                    kind,
                    &conn,
                    stream,
                    pending_request,
                    self.wait,
                    deadline,
                    self.allow_replacement,
                    previous.as_ref().map(|p| p.pid),
                    lock.is_some(),
                )
                .await?;
                match (owned, &mut lock) {
                    (Some(stream), _) => {
                        tasks.push(tokio::spawn(watch_bus(
                            stream,
                            name.to_string(),
                            loss_tx.clone(),
                            lock.as_ref()
                                .map(HeldLock::watch_handle)
                                .map(|lock| move || lock_still_held(&lock)),
                        )));
                        Some(HeldName::new(kind, conn, disconnect))
                    }
                    // The bus went away before granting the name: the lock file alone holds the
                    // instance, as when no bus was reachable, and the record says so again.
                    // (Ending the connection here leaves nothing of ours on a bus that comes
                    // back.)
                    (None, Some(held)) => {
                        drop((conn, disconnect));
                        held.write_record(&LockRecord::for_self(
                            vec![Backend::LockFile],
                            None,
                            None,
                        ))?;
                        None
                    }
                    // Without the lock file `own_name` reports the bus's loss as an error.
                    (None, None) => {
                        return Err(Error::NoUsableBackend {
                            name: name.to_string(),
                            reason: format!("the {kind} bus went away before it granted the name"),
                            source: None,
                        });
                    }
                }
            }
            None => None,
        };

        if let Some(held) = &mut lock {
            tasks.extend(lockfile::start_watch(
                held,
                inotify,
                self.recheck,
                &loss_tx,
            )?);
        }
        tracing::info!(
            name = %name,
            lock_file = ?lock.as_ref().map(HeldLock::path),
            bus = ?bus.as_ref().map(HeldName::kind),
            "acquired instance"
        );
        Ok(InstanceGuard::new(GuardParts {
            name,
            scope,
            lock,
            bus,
            loss_log: loss_tx,
            losses: loss_rx,
            tasks,
            lock_watch: None,
            wait_watch,
        }))
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
    let mut held = match lockfile::lock(&plan, &mut dir, false)? {
        Attempt::Acquired(held, _) => held,
        Attempt::Busy(holder) => return Err(already_running(&name, holder)),
    };
    held.write_record(&LockRecord::for_self(vec![Backend::LockFile], None, None))?;
    let (loss_tx, loss_rx) = watch::channel(Vec::new());
    let lock_watch = match inotify {
        Some(inotify) => Some(LockWatchThread::start(&mut held, inotify, loss_tx.clone())?),
        None => None,
    };
    Ok(InstanceGuard::new(GuardParts {
        name,
        scope,
        lock: Some(held),
        bus: None,
        loss_log: loss_tx,
        losses: loss_rx,
        tasks: Vec::new(),
        lock_watch,
        wait_watch: None,
    }))
}

/// Whether the lock file is ours right now, for the bus's watch when the connection closes:
/// not what held at acquisition, but what holds now, since the lock file may have gone
/// unnoticed (the watch turned off, or a directory above it moved). A lock file merely removed
/// is re-created first (see `WatchHandle::recover`).
fn lock_still_held(lock: &lockfile::WatchHandle) -> bool {
    lock.check_path()
        .is_none_or(|_| lock.recover() != lockfile::Recovery::Lost)
        && lock.verify_held()
}
