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
use crate::loss::LossReason;
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
    /// Owned with `ALLOW_REPLACEMENT`: another connection may have taken the name, and a
    /// release that cannot ask the bus on this connection asks on another (see
    /// [`still_ours`]).
    replaceable: bool,
}

impl HeldName {
    pub(crate) fn new(
        kind: BusKind,
        conn: Connection,
        disconnect: Option<Disconnect>,
        replaceable: bool,
    ) -> Self {
        HeldName {
            kind,
            conn,
            disconnect,
            pid: std::process::id(),
            runtime: tokio::runtime::Handle::try_current()
                .ok()
                .map(|h| (h.id(), h.runtime_flavor())),
            replaceable,
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
    /// `Some` when the name had stopped being ours before (see [`NotOursAtRelease`]).
    pub(crate) async fn release(self, name: &str) -> Result<NotOursAtRelease> {
        let Some(this) = self.in_another_process() else {
            return Ok(None);
        };
        if !this.answered_here()
            && let Some(disconnect) = this.disconnect
        {
            let asked = this.replaceable.then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                ask_on_a_thread(this.kind, &this.conn, name, move |ours| {
                    let _ = tx.send(ours);
                });
                rx
            });
            let ours = match asked {
                Some(rx) => rx.await.ok().flatten(),
                None => None,
            };
            return end_connection(this.kind, this.conn, disconnect, ours);
        }
        let released = release_bus(this.kind, this.conn, name).await;
        settle(this.kind, released, this.disconnect, Keep::Connection)
    }

    /// Releases the name without awaiting anything, from any thread, inside a runtime or not:
    /// through `service` (the runtime of the guard's service thread, when it has one and this is
    /// not that thread), else by ending the connection and waiting until the bus closed it.
    pub(crate) fn release_blocking(
        self,
        service: Option<&tokio::runtime::Handle>,
        name: &str,
    ) -> Result<NotOursAtRelease> {
        let Some(HeldName {
            kind,
            conn,
            disconnect,
            replaceable,
            ..
        }) = self.in_another_process()
        else {
            return Ok(None);
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
                    Ok(released) => settle(kind, released, disconnect, Keep::Nothing),
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
            (None, Some(disconnect)) => {
                let ours = replaceable.then(|| {
                    let (tx, rx) = std::sync::mpsc::channel();
                    ask_on_a_thread(kind, &conn, name, move |ours| {
                        let _ = tx.send(ours);
                    });
                    // The thread gives up by itself (see `still_ours`).
                    rx.recv().ok().flatten()
                });
                end_connection(kind, conn, disconnect, ours.flatten())
            }
            (None, None) => release_without_socket(kind, conn, name),
        }
    }
}

/// How the name had been lost before the release, without the release knowing it until then:
/// the bus answered `ReleaseName` that it was not ours (replaced, with no queue entry left), or
/// had closed the connection already (it died, or dropped us). `None`: it was ours until the
/// release freed it, or that cannot be known (a transport zbus connected itself).
pub(crate) type NotOursAtRelease = Option<LossReason>;

/// What [`release_bus`] found: whether the bus itself answered `ReleaseName`, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// The bus replied that it released the name: it is free.
    Replied,
    /// The bus replied that the name was not ours (`NOT_OWNER`, `NON_EXISTENT`): another
    /// connection had replaced us, and we were in no queue.
    NotOurs,
    /// No reply, because zbus considers the connection over. That is not proof that the bus
    /// dropped us: in zbus 6 a connection is also closed once its reader task is gone (its
    /// runtime dropped or shut down, the task ended on a message it could not parse) while the
    /// socket stays connected, and with it the name.
    Ended,
}

/// What a release leaves of the connection once the bus answered `ReleaseName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Left to zbus, to close with its last handle ([`HeldName::release`] on the acquiring
    /// runtime: the program's clones of it go on working).
    Connection,
    /// Ended, clones included (a blocking release: see `InstanceGuard::connection`).
    Nothing,
}

/// The end of a release, once `ReleaseName` was answered or not: the connection is left to
/// zbus only after a real reply, and only when asked (`keep`); otherwise it is ended through our
/// duplicate of its socket, and without a reply the release succeeds only once the bus has
/// closed it (then the name is free).
fn settle(
    kind: BusKind,
    released: Result<Released>,
    disconnect: Option<Disconnect>,
    keep: Keep,
) -> Result<NotOursAtRelease> {
    match (released, disconnect) {
        (Ok(replied @ (Released::Replied | Released::NotOurs)), disconnect) => {
            match (disconnect, keep) {
                (Some(disconnect), Keep::Connection) => disconnect.disarm(),
                // Ended, so clones of the connection end with it, and gone from the bus before
                // the release returns. The name is free already: a bus slow to see the end
                // fails nothing.
                (Some(disconnect), Keep::Nothing) => {
                    let _ = disconnect.wait(RELEASE_TIMEOUT);
                }
                (None, _) => {}
            }
            Ok((replied == Released::NotOurs).then_some(LossReason::Replaced))
        }
        (Ok(Released::Ended), Some(disconnect)) => {
            let lost = disconnect.closed_by_the_bus();
            wait_closed(kind, disconnect)?;
            Ok(lost.then_some(LossReason::BusConnectionClosed))
        }
        // No socket of ours to make sure with (a transport zbus connected itself): zbus saw
        // the connection end, which is all that can be known.
        (Ok(Released::Ended), None) => Ok(None),
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
/// bus has seen it: needs no runtime, and no reply read by one. `ours`: whether the bus listed
/// this connection as the name's owner just before, when that was asked (see [`still_ours`]).
fn end_connection(
    kind: BusKind,
    conn: Connection,
    disconnect: Disconnect,
    ours: Option<bool>,
) -> Result<NotOursAtRelease> {
    let closed = disconnect.closed_by_the_bus();
    let result = wait_closed(kind, disconnect);
    drop(conn);
    result.map(|()| {
        if closed {
            Some(LossReason::BusConnectionClosed)
        } else if ours == Some(false) {
            Some(LossReason::Replaced)
        } else {
            None
        }
    })
}

/// How long asking the bus on a connection of its own whether the name is still ours may take
/// before the release goes on without the answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs [`still_ours`] on a thread of its own, with a runtime of its own (the release may run
/// inside any runtime, or none), and hands the answer to `answer`: `None` when it cannot be
/// had.
fn ask_on_a_thread(
    kind: BusKind,
    conn: &Connection,
    name: &str,
    answer: impl FnOnce(Option<bool>) + Send + 'static,
) {
    let (conn, name) = (conn.clone(), name.to_owned());
    let asked = std::thread::Builder::new()
        .name("unique-instance-ask".into())
        .spawn(move || {
            let ours = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
                .and_then(|rt| {
                    rt.block_on(async {
                        tokio::time::timeout(ASK_TIMEOUT, still_ours(kind, &conn, &name))
                            .await
                            .ok()
                            .flatten()
                    })
                });
            answer(ours);
        });
    if let Err(e) = asked {
        tracing::debug!(error = %e, "cannot ask the bus whether the name is still ours");
    }
}

/// Whether the bus lists `conn` as the owner of `name`, asked on a new connection to the same
/// bus: what a release that ends `conn` without `ReleaseName` (its runtime may not run to read
/// the reply) uses to tell a name taken over meanwhile (allowed by `ALLOW_REPLACEMENT`) from
/// one it frees. `None` when that cannot be known: the bus at the address is not the one `conn`
/// is on (the environment changed), or it does not answer.
async fn still_ours(kind: BusKind, conn: &Connection, name: &str) -> Option<bool> {
    let ours = conn.unique_name()?.to_string();
    let side = super::connect(kind, Vec::new(), None).await.ok()?;
    if side.conn.server_guid() != conn.server_guid() {
        return None;
    }
    let owner = side
        .conn
        .call_method(
            Some(super::DBUS_NAME),
            super::DBUS_PATH,
            Some(super::DBUS_NAME),
            "GetNameOwner",
            &(name,),
        )
        .await;
    match owner {
        Ok(reply) => Some(reply.body().deserialize::<String>().ok()? == ours),
        Err(e) if super::name::is_name_has_no_owner(&e) => Some(false),
        Err(_) => None,
    }
}

/// Releases the name of a connection whose socket zbus made itself (`nonce-tcp:`, `unixexec:`:
/// see [`super::connect::connect_to`]), as well as the runtime we are in allows: inside a
/// current-thread runtime, which cannot be waited in, the connection is dropped, and closes
/// only when that runtime runs again; that is said, not reported as done.
pub(crate) fn release_without_socket(
    kind: BusKind,
    conn: Connection,
    name: &str,
) -> Result<NotOursAtRelease> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            let released =
                tokio::task::block_in_place(|| handle.block_on(release_bus(kind, conn, name)));
            settle(kind, released, None, Keep::Nothing)
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
            Ok(rt) => {
                let released = rt.block_on(release_bus(kind, conn, name));
                settle(kind, released, None, Keep::Nothing)
            }
            Err(_) => {
                drop(conn);
                Ok(None)
            }
        },
    }
}

/// Asks the bus to release `name`: [`Released::Replied`] or [`Released::NotOurs`] only when
/// it answered.
pub(crate) async fn release_bus(kind: BusKind, conn: Connection, name: &str) -> Result<Released> {
    // So that a test can kill the bus at this moment.
    crate::test_hooks::stop_at(crate::test_hooks::Hook::BeforeReleaseName);
    // Closed for zbus is not closed on the bus (see `Released::Ended`): the caller makes sure.
    if conn.is_closed() {
        return Ok(Released::Ended);
    }
    let result = tokio::time::timeout(Duration::from_secs(5), release_name(&conn, name)).await;
    match result {
        Ok(Ok(zbus::fdo::ReleaseNameReply::Released)) => Ok(Released::Replied),
        Ok(Ok(
            zbus::fdo::ReleaseNameReply::NonExistent | zbus::fdo::ReleaseNameReply::NotOwner,
        )) => Ok(Released::NotOurs),
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
