//! The one guard type: proof that this process is the running instance.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dbus;
use crate::error::{Error, Result};
use crate::holder::BackendKind;
use crate::lockfile::HeldLock;
use crate::name::InstanceName;
use crate::scope::{BusKind, Scope};

/// Why (part of) the instance was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// Another copy took the bus name (only possible when replacement was allowed).
    Replaced,
    /// The bus connection closed (the bus daemon died or dropped us).
    BusConnectionClosed,
    /// The lock file was removed by someone else (seen by the watch or the periodic re-check).
    LockFileRemoved,
    /// The lock file was replaced by another file (seen by the watch or the periodic re-check).
    LockFileReplaced,
    /// The lock file's directory (or a directory above it) was removed, moved or replaced, or a
    /// symlink on the way was retargeted: our file is still in the directory we opened, but the
    /// lock path no longer leads to it, so a copy started now would lock another one.
    LockDirectoryRemoved,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossReason::Replaced => "replaced by another instance on the bus",
            LossReason::BusConnectionClosed => "the bus connection closed",
            LossReason::LockFileRemoved => "the lock file was removed by someone else",
            LossReason::LockFileReplaced => "the lock file was replaced by someone else",
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
    /// [`InstanceGuard::is_exclusive`] is false once any loss said false.
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

pub(crate) type LossLog = watch::Sender<Vec<Loss>>;

/// Follows an instance's losses independently of its guard; see [`InstanceGuard::loss_watcher`].
#[derive(Debug, Clone)]
pub struct LossWatcher {
    losses: watch::Receiver<Vec<Loss>>,
    seen: usize,
}

impl LossWatcher {
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

/// Runs `fut` on this thread until it completes or `timeout` passes (`None`: no limit), with no
/// runtime: a blocking call made inside a runtime must not start one (tokio panics), and
/// waiting on a channel needs none.
pub(crate) fn block_here<F: std::future::Future>(
    fut: F,
    timeout: Option<Duration>,
) -> Option<F::Output> {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    // Unconstrained: inside a task whose cooperative budget is spent, tokio's primitives would
    // answer "pending" for ever, and this loop never returns to the scheduler to refill it.
    let mut fut = std::pin::pin!(tokio::task::unconstrained(fut));
    // A timeout too large to add is no limit.
    let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                std::thread::park_timeout(left);
            }
            None => std::thread::park(),
        }
    }
}

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
/// the acquiring process removes the lock file: a guard dropped (or released) in a forked child
/// closes the child's descriptor and leaves the file and the lock alone. The reverse is the
/// hazard: a parent that forks the process which keeps the instance must not let its own
/// guard's destructor run (leave with [`std::process::exit`], or [`std::mem::forget`] the
/// guard), because the parent is the acquiring process and would remove the lock file that its
/// child still holds through the shared open file description; a new copy would then create a
/// new file and run beside the child.
#[must_use = "the instance is released as soon as the guard is dropped"]
pub struct InstanceGuard {
    pub(crate) name: InstanceName,
    pub(crate) scope: Scope,
    pub(crate) lock: Option<HeldLock>,
    pub(crate) bus: Option<(BusKind, zbus::Connection)>,
    pub(crate) losses: watch::Receiver<Vec<Loss>>,
    /// Keeps the loss channel open for as long as the guard lives, even with no task feeding it,
    /// so that watchers see its end only when the guard is gone.
    pub(crate) _loss_log: LossLog,
    pub(crate) seen_losses: usize,
    pub(crate) tasks: Vec<JoinHandle<()>>,
    /// The runtime that services the connection when the guard came from the blocking API.
    pub(crate) runtime: Option<ServiceThread>,
    /// Ends the bus connection without its runtime (see [`dbus::Disconnect`]), so that a release
    /// frees the name before the lock file wherever it runs. `None` with no bus, or on a
    /// transport zbus connected itself.
    pub(crate) disconnect: Option<dbus::Disconnect>,
    /// The lock-file watch of a guard that has no runtime (the lock file alone, blocking API).
    pub(crate) lock_watch: Option<crate::options::LockWatchThread>,
    /// The inotify instance a wait for the lock file used, with no watches left: closed with the
    /// guard, after the lock, because closing one takes milliseconds (see
    /// `lockfile::ReleaseWatch::into_quiet`).
    pub(crate) _wait_watch: Option<std::os::fd::OwnedFd>,
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

impl InstanceGuard {
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

    /// The backends that hold the instance, lock file first.
    pub fn backends(&self) -> Vec<BackendKind> {
        let mut v = Vec::new();
        if self.lock.is_some() {
            v.push(BackendKind::LockFile);
        }
        if self.bus.is_some() {
            v.push(BackendKind::Dbus);
        }
        v
    }

    /// The lock file held, if any.
    pub fn lock_file(&self) -> Option<&Path> {
        self.lock.as_ref().map(HeldLock::path)
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
    /// or `Drop`, which remove the lock file first: a new copy then creates and locks a new file
    /// at the same path, while the old one is still held by whoever kept the duplicate. Give a
    /// duplicate only to processes that end before the guard is released (`run` stops every
    /// process COMMAND left behind before it releases). Whoever holds a duplicate may also write
    /// the holder record.
    pub fn lock_file_descriptor(&self) -> Option<BorrowedFd<'_>> {
        self.lock.as_ref().map(AsFd::as_fd)
    }

    /// The bus the name is owned on, if any.
    pub fn bus_kind(&self) -> Option<BusKind> {
        self.bus.as_ref().map(|(kind, _)| *kind)
    }

    /// Our unique name on the bus (`:1.42`), if the name is owned on a bus.
    pub fn bus_unique_name(&self) -> Option<String> {
        self.bus
            .as_ref()
            .and_then(|(_, c)| c.unique_name().map(|n| n.to_string()))
    }

    /// The connection that owns the name: serve your own objects on it.
    ///
    /// # Caveats
    ///
    /// The connection belongs to the instance: a blocking release (`drop`, [`release`]) ends
    /// it, clones included, so that the bus has dropped the name before the lock file is
    /// freed, whatever runtime the release runs in. [`release_async`] leaves it to close with
    /// its last handle after `ReleaseName` was answered.
    ///
    /// [`release`]: InstanceGuard::release
    /// [`release_async`]: InstanceGuard::release_async
    pub fn connection(&self) -> Option<&zbus::Connection> {
        self.bus.as_ref().map(|(_, c)| c)
    }

    /// Tells systemd this service is ready: `READY=1` and a `STATUS=` line naming the instance,
    /// when `NOTIFY_SOCKET` is set (a `Type=notify` unit); nothing otherwise. For programs that
    /// turned [`crate::InstanceOptions::notify_ready`] off to finish their own setup first.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the notification socket cannot be reached.
    pub fn notify_ready(&self) -> Result<()> {
        crate::notify::ready(self)
    }

    /// Every loss seen so far, oldest first.
    pub fn losses(&self) -> Vec<Loss> {
        self.losses.borrow().clone()
    }

    /// False once a loss left no backend excluding other copies.
    pub fn is_exclusive(&self) -> bool {
        self.losses.borrow().iter().all(|l| l.still_exclusive)
    }

    /// A watcher of this guard's losses that can be moved to another thread or task, so one
    /// part of a program waits for losses while another holds the guard. It starts before the
    /// first loss not yet returned by [`InstanceGuard::next_loss`].
    pub fn loss_watcher(&self) -> LossWatcher {
        LossWatcher {
            losses: self.losses.clone(),
            seen: self.seen_losses,
        }
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
    /// [`Error::Bus`] if `ReleaseName` failed, [`Error::Io`] if the lock file could not be
    /// removed. The instance is released in any case: closing our descriptors releases it.
    ///
    /// # Caveats
    ///
    /// From inside a single-threaded tokio runtime this cannot wait for the bus, so it closes the
    /// connection instead (the bus releases the name when it sees the close). Use
    /// [`InstanceGuard::release_async`] there.
    pub fn release(mut self) -> Result<()> {
        self.release_blocking()
    }

    /// Releases the instance from async code, reporting any failure.
    ///
    /// # Errors
    ///
    /// As [`InstanceGuard::release`].
    pub async fn release_async(mut self) -> Result<()> {
        self.stop_tasks();
        let bus_result = match self.bus.take() {
            Some((kind, conn)) => {
                let released = release_bus(kind, conn, self.name.as_str()).await;
                match (released, self.disconnect.take()) {
                    (Ok(()), disconnect) => {
                        if let Some(disconnect) = disconnect {
                            disconnect.disarm();
                        }
                        Ok(())
                    }
                    // Not answered (a connection whose runtime does not run, a bus that
                    // stalls): end the connection, so the name is free before the lock file.
                    (Err(e), Some(disconnect)) => {
                        let _ = disconnect.wait(RELEASE_TIMEOUT);
                        Err(e)
                    }
                    (Err(e), None) => Err(e),
                }
            }
            None => Ok(()),
        };
        let lock_result = self.lock.take().map_or(Ok(()), HeldLock::release);
        // Ends the service thread, if any, and with it the connection's tasks.
        self.runtime.take();
        bus_result.and(lock_result)
    }

    fn stop_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Stopped before the lock file is removed, so that our own removal is not
        // reported as a loss.
        self.lock_watch.take();
    }

    /// Releases without awaiting anything, from any thread, inside a runtime or not: the bus
    /// name first (through the guard's service thread when it has one, else by ending the
    /// connection and waiting until the bus closed it), then the lock file.
    fn release_blocking(&mut self) -> Result<()> {
        self.stop_tasks();
        let bus_result = match self.bus.take() {
            Some((kind, conn)) => {
                let disconnect = self.disconnect.take();
                let service = self
                    .runtime
                    .as_ref()
                    .filter(|s| !s.is_current_thread())
                    .map(ServiceThread::handle);
                match (service, disconnect) {
                    (Some(rt), disconnect) => {
                        // Run it on the guard's own thread and wait on a plain channel:
                        // `Runtime::block_on` would panic if this drop happens inside another
                        // runtime.
                        let (tx, rx) = std::sync::mpsc::channel();
                        let name = self.name.to_string();
                        rt.spawn(async move {
                            let _ = tx.send(release_bus(kind, conn, &name).await);
                        });
                        match rx.recv() {
                            Ok(Ok(())) => {
                                if let Some(disconnect) = disconnect {
                                    disconnect.disarm();
                                }
                                Ok(())
                            }
                            Ok(Err(e)) => {
                                if let Some(disconnect) = disconnect {
                                    let _ = disconnect.wait(RELEASE_TIMEOUT);
                                }
                                Err(e)
                            }
                            // The service thread is gone (it panicked): its runtime, and with it
                            // the connection, went down with it; make sure, and say so.
                            Err(_) => {
                                if let Some(disconnect) = disconnect {
                                    let _ = disconnect.wait(RELEASE_TIMEOUT);
                                }
                                Err(Error::Bus {
                                    context: "cannot release the name",
                                    bus: kind,
                                    source: zbus::Error::Failure(
                                        "the thread that services the bus connection has ended"
                                            .into(),
                                    ),
                                })
                            }
                        }
                    }
                    (None, Some(disconnect)) => {
                        // The connection's runtime may be idle, or blocked in this very call:
                        // end the connection ourselves, and wait until the bus has seen it.
                        let result = disconnect.wait(RELEASE_TIMEOUT).map_err(|e| Error::Bus {
                            context: "cannot release the name",
                            bus: kind,
                            source: zbus::Error::InputOutput(std::sync::Arc::new(e)),
                        });
                        drop(conn);
                        result
                    }
                    (None, None) => release_without_socket(kind, conn, self.name.as_str()),
                }
            }
            None => Ok(()),
        };
        let lock_result = self.lock.take().map_or(Ok(()), HeldLock::release);
        // Ends the service thread, if any, and with it the connection's tasks.
        self.runtime.take();
        bus_result.and(lock_result)
    }
}

/// How long a release waits for the bus.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Releases the name of a connection whose socket zbus made itself (a transport other than a
/// Unix socket), as well as the runtime we are in allows.
fn release_without_socket(kind: BusKind, conn: zbus::Connection, name: &str) -> Result<()> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(release_bus(kind, conn, name)))
        }
        Ok(_) => {
            // Cannot wait here: closing the connection makes the bus release the name as soon
            // as it notices.
            drop(conn);
            Ok(())
        }
        Err(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(release_bus(kind, conn, name)),
            Err(_) => {
                drop(conn);
                Ok(())
            }
        },
    }
}

/// A current-thread runtime driven by a thread of its own: it services the bus connection of a
/// guard from the blocking API. Dropping it ends the thread and the runtime's tasks.
pub(crate) struct ServiceThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    /// The thread: a release made on it (from a method of an object it serves) must not wait
    /// for it.
    thread: std::thread::ThreadId,
}

impl ServiceThread {
    /// Hands `rt` to a new thread; gives it back if the thread cannot be started.
    pub(crate) fn start(
        rt: tokio::runtime::Runtime,
    ) -> std::result::Result<Self, (tokio::runtime::Runtime, std::io::Error)> {
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The runtime comes back through this slot if the spawn fails.
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(rt)));
        let thread_slot = std::sync::Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("unique-instance".into())
            .spawn(move || {
                let rt = thread_slot.lock().ok().and_then(|mut s| s.take());
                if let Some(rt) = rt {
                    // Ends when the guard drops its sender.
                    let _ = rt.block_on(stopped);
                    rt.shutdown_background();
                }
            });
        match spawned {
            Ok(thread) => Ok(ServiceThread {
                handle,
                _stop: stop,
                thread: thread.thread().id(),
            }),
            Err(e) => {
                let rt = slot.lock().ok().and_then(|mut s| s.take());
                match rt {
                    Some(rt) => Err((rt, e)),
                    None => unreachable!("the runtime is taken only by a thread that started"),
                }
            }
        }
    }

    /// A service thread already running `handle`'s runtime until `stop` is dropped.
    pub(crate) fn from_parts(
        handle: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::ThreadId,
    ) -> Self {
        ServiceThread {
            handle,
            _stop: stop,
            thread,
        }
    }

    /// Is this the service thread itself?
    fn is_current_thread(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

async fn release_bus(kind: BusKind, conn: zbus::Connection, name: &str) -> Result<()> {
    if conn.is_closed() {
        return Ok(());
    }
    let result =
        tokio::time::timeout(Duration::from_secs(5), dbus::release_name(&conn, name)).await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Bus {
            context: "cannot release the name",
            bus: kind,
            source,
        }),
        Err(_) => Err(Error::Bus {
            context: "cannot release the name",
            bus: kind,
            source: zbus::Error::Failure("the bus did not answer ReleaseName within 5 s".into()),
        }),
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
        let (loss_tx, loss_rx) = watch::channel(Vec::new());
        let guard = InstanceGuard {
            name: InstanceName::new(name).expect("name"),
            scope: Scope::User,
            lock: None,
            bus: Some((BusKind::Session, connected.conn)),
            losses: loss_rx,
            _loss_log: loss_tx,
            seen_losses: 0,
            tasks: Vec::new(),
            runtime: Some(ServiceThread::from_parts(
                handle,
                stop,
                std::thread::spawn(|| ()).thread().id(),
            )),
            disconnect: connected.disconnect,
            lock_watch: None,
            _wait_watch: None,
        };
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
