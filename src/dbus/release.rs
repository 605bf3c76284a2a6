//! The name once owned ([`HeldName`]: its bus, the connection, and the handle that ends that
//! connection without zbus) and giving it back: `ReleaseName`, as well as the runtime the
//! release runs in allows, else by ending the connection, so the name is free when it returns.
//! It must not release anything but the name (the guard orders the backends' releases).
//!
//! Only the process that acquired the name releases it: a child made by `fork` shares the
//! connection's socket, and a release there (`ReleaseName` through a runtime whose threads the
//! child does not have, or a shutdown of the shared socket) would hang or take the name from
//! the acquiring process. In another process a release closes only that process's descriptors.

use std::time::Duration;

use zbus::Connection;

use super::{Disconnect, release_name};
use crate::error::{Error, Result};
use crate::scope::BusKind;

/// How long a release waits for the bus.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bus name an instance owns.
pub(crate) struct HeldName {
    kind: BusKind,
    conn: Connection,
    /// Ends the bus connection without its runtime (see [`Disconnect`]), so that a release
    /// frees the name before the lock file wherever it runs. `None` on a transport zbus
    /// connected itself.
    disconnect: Option<Disconnect>,
    /// The process that acquired the name: the only one that releases it.
    pid: u32,
    /// The runtime the connection was made on, whose tasks read its replies: `None` outside
    /// any (never: connections are made in async code).
    runtime: Option<(tokio::runtime::Id, tokio::runtime::RuntimeFlavor)>,
}

impl HeldName {
    pub(crate) fn new(kind: BusKind, conn: Connection, disconnect: Option<Disconnect>) -> Self {
        HeldName {
            kind,
            conn,
            disconnect,
            pid: std::process::id(),
            runtime: tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| (h.id(), h.runtime_flavor())),
        }
    }

    /// Whether a reply to `ReleaseName` can be read from where this is called: on the runtime
    /// that made the connection, or when that runtime has worker threads of its own (a
    /// multi-threaded one runs until it is dropped or shut down; then zbus's reader task is
    /// gone, zbus calls the connection closed, and [`release_bus`] says so rather than taking it
    /// for a release). From another runtime, a current-thread one that made the connection may
    /// be idle (nothing drives it while this waits), and the reply would never be read.
    fn answered_here(&self) -> bool {
        match self.runtime {
            Some((_, tokio::runtime::RuntimeFlavor::MultiThread)) | None => true,
            Some((id, _)) => tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == id),
        }
    }

    /// `Some(self)` in the process that acquired the name. In any other (a child after `fork`)
    /// it closes this process's duplicate of the socket and leaves the name and the connection
    /// to the acquiring process: `None`. The connection itself is not dropped there: its state
    /// belongs to zbus's tasks on a runtime whose threads this process does not have, so it is
    /// left untouched (a little memory), and its socket's descriptor stays open in this process
    /// until it exits or executes a program (it is close-on-exec).
    fn in_another_process(self) -> Option<Self> {
        if std::process::id() == self.pid {
            return Some(self);
        }
        tracing::debug!(
            acquired_by = self.pid,
            "bus name released in a forked process: the name and its connection are left to the process that acquired them"
        );
        let HeldName {
            conn, disconnect, ..
        } = self;
        if let Some(disconnect) = disconnect {
            disconnect.disarm();
        }
        std::mem::forget(conn);
        None
    }

    /// The bus the name is owned on.
    pub(crate) fn kind(&self) -> BusKind {
        self.kind
    }

    /// The connection that owns the name.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The descriptor of the connection's socket (a duplicate of zbus's), when we made the
    /// socket.
    pub(crate) fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.disconnect.as_ref().and_then(Disconnect::socket)
    }

    /// Releases the name from async code: `ReleaseName`, or, on a runtime other than the one
    /// that made the connection (whose replies it may not be reading, see
    /// [`HeldName::answered_here`]), by ending the connection as a blocking release does.
    pub(crate) async fn release(self, name: &str) -> Result<()> {
        let Some(this) = self.in_another_process() else {
            return Ok(());
        };
        if !this.answered_here()
            && let Some(disconnect) = this.disconnect
        {
            return end_connection(this.kind, this.conn, disconnect);
        }
        let released = release_bus(this.kind, this.conn, name).await;
        settle(this.kind, released, this.disconnect)
    }

    /// Releases the name without awaiting anything, from any thread, inside a runtime or not:
    /// through `service` (the runtime of the guard's service thread, when it has one and this is
    /// not that thread), else by ending the connection and waiting until the bus closed it.
    pub(crate) fn release_blocking(
        self,
        service: Option<&tokio::runtime::Handle>,
        name: &str,
    ) -> Result<()> {
        let Some(HeldName {
            kind,
            conn,
            disconnect,
            ..
        }) = self.in_another_process()
        else {
            return Ok(());
        };
        match (service, disconnect) {
            (Some(rt), disconnect) => {
                // Run it on the guard's own thread and wait on a plain channel:
                // `Runtime::block_on` would panic if this drop happens inside another
                // runtime.
                let (tx, rx) = std::sync::mpsc::channel();
                let name = name.to_string();
                rt.spawn(async move {
                    let _ = tx.send(release_bus(kind, conn, &name).await);
                });
                match rx.recv() {
                    Ok(released) => settle(kind, released, disconnect),
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
                                "the thread that services the bus connection has ended".into(),
                            ),
                        })
                    }
                }
            }
            // The connection's runtime may be idle, or blocked in this very call.
            (None, Some(disconnect)) => end_connection(kind, conn, disconnect),
            (None, None) => release_without_socket(kind, conn, name),
        }
    }
}

/// What [`release_bus`] found: whether the bus itself answered `ReleaseName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// The bus replied: the name is free, and the connection can be left to zbus.
    Replied,
    /// No reply, because zbus considers the connection over. That is not proof that the bus
    /// dropped us: in zbus 6 a connection is also closed once its reader task is gone (its
    /// runtime dropped or shut down, the task ended on a message it could not parse) while the
    /// socket stays connected, and with it the name.
    Ended,
}

/// The end of a release, once `ReleaseName` was answered or not: the connection is left to
/// zbus only after a real reply; otherwise it is ended through our duplicate of its socket, and
/// the release succeeds only once the bus has closed it (then the name is free).
fn settle(kind: BusKind, released: Result<Released>, disconnect: Option<Disconnect>) -> Result<()> {
    match (released, disconnect) {
        (Ok(Released::Replied), disconnect) => {
            if let Some(disconnect) = disconnect {
                disconnect.disarm();
            }
            Ok(())
        }
        (Ok(Released::Ended), Some(disconnect)) => wait_closed(kind, disconnect),
        // No socket of ours to make sure with (a transport zbus connected itself): zbus saw
        // the connection end, which is all that can be known.
        (Ok(Released::Ended), None) => Ok(()),
        // Not answered (a connection whose runtime does not run, a bus that stalls): end the
        // connection, so the name is free before the lock file.
        (Err(e), Some(disconnect)) => {
            let _ = disconnect.wait(RELEASE_TIMEOUT);
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// Ends the connection through `disconnect` and waits until the bus closed it.
fn wait_closed(kind: BusKind, disconnect: Disconnect) -> Result<()> {
    disconnect.wait(RELEASE_TIMEOUT).map_err(|e| Error::Bus {
        context: "cannot release the name",
        bus: kind,
        source: zbus::Error::InputOutput(std::sync::Arc::new(e)),
    })
}

/// Releases the name by ending the connection ourselves (see [`Disconnect`]), waiting until the
/// bus has seen it: needs no runtime, and no reply read by one.
fn end_connection(kind: BusKind, conn: Connection, disconnect: Disconnect) -> Result<()> {
    let result = wait_closed(kind, disconnect);
    drop(conn);
    result
}

/// Releases the name of a connection whose socket zbus made itself (`nonce-tcp:`, `unixexec:`:
/// see [`super::connect::connect_to`]), as well as the runtime we are in allows: inside a
/// current-thread runtime, which cannot be waited in, the connection is dropped, and closes
/// only when that runtime runs again; that is said, not reported as done.
pub(crate) fn release_without_socket(kind: BusKind, conn: Connection, name: &str) -> Result<()> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(release_bus(kind, conn, name))).map(drop)
        }
        Ok(_) => {
            // Cannot wait here: the connection closes, and the bus releases the name, once this
            // runtime runs again. Not a release done: an error, so that the caller knows (a
            // review found it reported as done while the name stayed owned).
            drop(conn);
            Err(Error::Bus {
                context: "cannot release the name before this runtime runs again",
                bus: kind,
                source: zbus::Error::Failure(
                    "on this transport a release inside a current-thread runtime only drops the \
                     connection; release from async code (`release_async`) instead"
                        .into(),
                ),
            })
        }
        Err(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(release_bus(kind, conn, name)).map(drop),
            Err(_) => {
                drop(conn);
                Ok(())
            }
        },
    }
}

/// Asks the bus to release `name`: [`Released::Replied`] only when it answered.
pub(crate) async fn release_bus(kind: BusKind, conn: Connection, name: &str) -> Result<Released> {
    // So that a test can kill the bus at this moment.
    crate::test_hooks::stop_at(crate::test_hooks::Hook::BeforeReleaseName);
    // Closed for zbus is not closed on the bus (see `Released::Ended`): the caller makes sure.
    if conn.is_closed() {
        return Ok(Released::Ended);
    }
    let result = tokio::time::timeout(Duration::from_secs(5), release_name(&conn, name)).await;
    match result {
        Ok(Ok(())) => Ok(Released::Replied),
        // The connection broke under the call (the bus died or dropped us): a name never
        // outlives its connection, so it is released as asked. (A bus that does not answer is
        // not this: that is the timeout below.)
        Ok(Err(zbus::Error::InputOutput(e)))
            if conn.is_closed()
                || matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::NotConnected
                ) =>
        {
            tracing::debug!(name, error = %e, "the bus connection ended as the name was released");
            Ok(Released::Ended)
        }
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
