//! The well-known name: requesting it with explicit flags, waiting in the bus's queue, and
//! naming its owner when it is taken.
//! It must not connect (that is `connect`) nor watch the name once owned (that is `watch`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zbus::Connection;
use zbus::OwnedVariant;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::Type as MessageType;

use super::connect::BusMessages;

use super::watch::{NameSignal, next_name_signal};
use super::{CALL_TIMEOUT, DBUS_NAME, DBUS_PATH};
use crate::error::{Error, Result, already_running};
use crate::holder::{
    Holder, process_executable, process_is_running, process_lives_on, process_start_time,
};
use crate::name::InstanceName;
use crate::options::Wait;
use crate::scope::{Backend, BusKind};
use crate::test_hooks::{self, Hook};

/// How long an instance that holds the lock file waits for the bus to drop a name still owned
/// by the lock's previous holder, which has died but whose disconnect the bus has not yet seen.
const DEAD_OWNER_GRACE: Duration = Duration::from_secs(5);

/// How long a copy whose wait in the bus's queue has ended gives the bus to take it out of the
/// queue and name the owner, before it says so with the owner unknown.
const AFTER_GIVING_UP: Duration = Duration::from_secs(1);

/// Requests the name with explicit flags and, when asked or when the previous lock holder's
/// connection is still being torn down, waits in the bus queue for it. `None` when the bus went
/// away before it granted the name while we hold the lock file (which then alone decides).
/// `previous_pid`: the process that held the lock file before us, by its record. `on_queued`
/// is called when the bus puts us in its queue behind another owner (only when asked to wait).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn own_name(
    name: &InstanceName,
    kind: BusKind,
    conn: &zbus::Connection,
    mut stream: BusMessages,
    pending_request: Option<std::num::NonZeroU32>,
    wait: Wait,
    deadline: Option<Instant>,
    allow_replacement: bool,
    previous_pid: Option<u32>,
    holding_lock: bool,
    on_queued: impl FnOnce(),
) -> Result<Option<BusMessages>> {
    let flags = request_flags(wait, allow_replacement);
    let bus_error = |context, source| Error::Bus {
        context,
        bus: kind,
        source,
    };
    let not_permitted = |source: zbus::Error| Error::NotPermitted {
        name: name.to_string(),
        reason: format!(
            "the {kind} bus policy does not allow this user to own {name}; install a D-Bus policy \
             file that allows it (see dbus/ in unique-instance)"
        ),
        source: Some(Box::new(source)),
    };
    // The bus went away before it granted the name (killed, restarting, or no answer within
    // the call timeout): that is a bus that is not there, as when it could not be reached at
    // connect time. With the lock file held, the lock file alone decides; without one, no
    // backend is left. Nothing of ours stays on the bus: the connection went with it (and the
    // caller drops it, which ends it, whatever the bus still had queued from us).
    let gone = |e: &zbus::Error| conn.is_closed() || matches!(e, zbus::Error::InputOutput(_));
    let bus_gone = |e: zbus::Error| -> Result<Option<BusMessages>> {
        if holding_lock {
            tracing::warn!(name = %name, bus = %kind, error = %e,
                "the {kind} bus went away before it granted the name; the lock file alone enforces exclusion");
            return Ok(None);
        }
        Err(Error::NoUsableBackend {
            name: name.to_string(),
            reason: format!(
                "the {kind} bus went away before it granted the name (it stopped, restarted or \
                 did not answer): try again once the {kind} bus runs, or use a backend with the \
                 lock file (auto or lockfile), which does not need the bus"
            ),
            source: Some(Box::new(e)),
        })
    };
    // Sent with the handshake when the transport allowed it (see `connect`): then only
    // its reply is awaited.
    let reply = match pending_request {
        Some(serial) => request_name_reply(&mut stream, serial).await,
        None => {
            test_hooks::stop_at(Hook::BeforeRequestName);
            request_name(conn, name.as_str(), flags).await
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) if is_access_denied(&e) => return Err(not_permitted(e)),
        Err(e) if gone(&e) => return bus_gone(e),
        Err(e) => return Err(bus_error("cannot request the name", e)),
    };
    // Owned with flags that queue us when replaced: they are made `DO_NOT_QUEUE` before the
    // name is taken as ours (see `leave_no_queue_behind`). `granted` are the flags of the
    // request that got it: a copy that does not wait still queues behind a dead holder (a
    // review saw one handed the name back after it was told it was replaced).
    let owned = |stream, granted| async move {
        match leave_no_queue_behind(conn, name, granted).await {
            Ok(()) => Ok(Some(stream)),
            Err(e) if is_access_denied(&e) => Err(not_permitted(e)),
            Err(e) if gone(&e) => bus_gone(e),
            Err(zbus::Error::NameTaken) => Err(already_running(
                name,
                Box::new(owner_of(conn, name.as_str(), kind).await),
            )),
            Err(e) => Err(bus_error("cannot request the name", e)),
        }
    };
    let mut queue_deadline = deadline;
    match reply {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => {
            return owned(stream, flags).await;
        }
        // Asked to wait (a plain attempt does not queue): behind an owner that is not a copy
        // holding the lock file, since we hold it (one that lost its lock file, one that owns
        // the name alone), whose refusals are to name it, not us (see `on_queued`). Unless it
        // is the lock's previous holder, dead, whose disconnect the bus has yet to process (see
        // `Exists` below): then we are about to run, and are named so (a review: the dead
        // connection was named instead, "holder unknown"). Asked only after a take-over.
        RequestNameReply::InQueue => {
            let behind_the_dead = holding_lock
                && previous_pid.is_some()
                && is_dead_previous(
                    previous_pid,
                    owner_and_connecting_pid(conn, name.as_str(), kind).await.1,
                );
            if !behind_the_dead {
                on_queued();
            }
        }
        RequestNameReply::Exists => {
            let (owner, connected_by, _) =
                owner_and_connecting_pid(conn, name.as_str(), kind).await;
            // We hold the lock file, yet the bus still lists the process that held it before
            // us: that process is dead (the kernel released its lock) and the bus has not yet
            // processed its disconnect. Queue for the name, briefly, rather than refuse. (By
            // the PID that made the connection: dead, it is not named in `owner`.)
            // A previous holder that lives on (it lost its lock file to a removal or a
            // replacement, and kept the name) is the instance on the bus: refused at once, not
            // after the grace (a review saw every copy stall 5 s so). One that is exiting, or
            // gone while another process keeps its connection open a moment longer, is not.
            let dead_previous = holding_lock && is_dead_previous(previous_pid, connected_by);
            if !dead_previous {
                return Err(already_running(name, Box::new(owner)));
            }
            tracing::debug!(name = %name, owner = %owner, "waiting for the bus to drop a dead holder");
            let retry_flags = flags & !RequestNameFlags::DO_NOT_QUEUE;
            match request_name(conn, name.as_str(), retry_flags).await {
                Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {
                    return owned(stream, retry_flags).await;
                }
                Ok(RequestNameReply::InQueue) => {}
                Ok(RequestNameReply::Exists) => return Err(already_running(name, Box::new(owner))),
                Err(e) if is_access_denied(&e) => return Err(not_permitted(e)),
                Err(e) if gone(&e) => return bus_gone(e),
                Err(e) => return Err(bus_error("cannot request the name", e)),
            }
            let grace = Instant::now() + DEAD_OWNER_GRACE;
            queue_deadline = Some(queue_deadline.map_or(grace, |d| d.min(grace)));
            if wait == Wait::No {
                queue_deadline = Some(grace);
            }
        }
    }
    test_hooks::stop_at(Hook::InBusQueue);
    // In the queue: the bus sends NameAcquired the moment the holder lets go.
    let acquired = async {
        loop {
            match next_name_signal(&mut stream, name.as_str()).await {
                Some(NameSignal::Acquired) => return true,
                Some(NameSignal::Lost) => continue,
                None => return false,
            }
        }
    };
    let outcome = match queue_deadline {
        Some(d) => tokio::time::timeout_at(d.into(), acquired).await.ok(),
        None => Some(acquired.await),
    };
    match outcome {
        // Granted from the queue: with the flags of the request that queued us.
        Some(true) => owned(stream, flags & !RequestNameFlags::DO_NOT_QUEUE).await,
        // The bus went away while we were in its queue.
        Some(false) => bus_gone(zbus::Error::InputOutput(std::sync::Arc::new(
            std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the connection closed while waiting for the name",
            ),
        ))),
        None => {
            // Leave the queue, so that we are not handed the name after giving up (the
            // connection, ended by the caller, leaves it too), and name the owner: the answer
            // is given, so a bus that stopped answering gets no more than `AFTER_GIVING_UP`
            // for both (a review's frozen bus stretched a 2 s wait to 52 s, two call timeouts).
            let leave_and_look = async {
                let _ = release_name(conn, name.as_str()).await;
                owner_of(conn, name.as_str(), kind).await
            };
            let holder = tokio::time::timeout(AFTER_GIVING_UP, leave_and_look)
                .await
                .unwrap_or_else(|_| Holder {
                    found_by: Some(Backend::Dbus),
                    bus: Some(kind),
                    ..Holder::default()
                });
            let holder = Box::new(holder);
            if wait == Wait::No {
                Err(already_running(name, holder))
            } else {
                Err(Error::TimedOut {
                    name: name.to_string(),
                    waited: match wait {
                        Wait::Timeout(d) => d,
                        _ => Duration::ZERO,
                    },
                    holder,
                })
            }
        }
    }
}

/// `RequestName`'s flags, always explicit: `DO_NOT_QUEUE` unless waiting, `ALLOW_REPLACEMENT`
/// only when asked (zbus's defaults would let a second copy steal the name).
pub(crate) fn request_flags(wait: Wait, allow_replacement: bool) -> RequestNameFlags {
    let mut flags = RequestNameFlags::empty();
    if wait == Wait::No {
        flags |= RequestNameFlags::DO_NOT_QUEUE;
    }
    if allow_replacement {
        flags |= RequestNameFlags::ALLOW_REPLACEMENT;
    }
    flags
}

/// Makes the name, just granted with `flags`, one we never wait for again: a copy that
/// requested it without `DO_NOT_QUEUE` (to wait) and allows replacement would, once replaced,
/// stay in the bus's queue and be handed the name back when the replacer leaves, owning it
/// again after it was told it had lost it (a review saw other copies refused, naming a holder
/// that had stopped being the instance). Asked again with `DO_NOT_QUEUE`, the bus updates the
/// primary owner's flags (`ALREADY_OWNER`). Nothing is sent when it cannot happen (no
/// replacement allowed, or `DO_NOT_QUEUE` already). [`zbus::Error::NameTaken`] when the name
/// was taken from us meanwhile.
async fn leave_no_queue_behind(
    conn: &Connection,
    name: &InstanceName,
    flags: RequestNameFlags,
) -> zbus::Result<()> {
    if !flags.contains(RequestNameFlags::ALLOW_REPLACEMENT)
        || flags.contains(RequestNameFlags::DO_NOT_QUEUE)
    {
        return Ok(());
    }
    match request_name(conn, name.as_str(), flags | RequestNameFlags::DO_NOT_QUEUE).await? {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(()),
        RequestNameReply::InQueue | RequestNameReply::Exists => {
            // Replaced in between: out of the queue, as the copy gives up.
            let _ = release_name(conn, name.as_str()).await;
            Err(zbus::Error::NameTaken)
        }
    }
}

/// Reads the reply to the `RequestName` call with `serial` from `stream`. Other messages read
/// meanwhile are only our own `NameAcquired` signals, which the reply makes redundant (the bus
/// sends them just before it).
pub(crate) async fn request_name_reply(
    stream: &mut BusMessages,
    serial: NonZeroU32,
) -> zbus::Result<RequestNameReply> {
    let reply = async {
        while let Some(msg) = stream.next().await {
            if msg.header().reply_serial() != Some(serial) {
                continue;
            }
            return match msg.message_type() {
                MessageType::MethodReturn => msg.body().deserialize::<RequestNameReply>(),
                MessageType::Error => Err(zbus::Error::from(msg)),
                _ => continue,
            };
        }
        Err(zbus::Error::InputOutput(Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the bus connection closed before RequestName was answered",
        ))))
    };
    match tokio::time::timeout(CALL_TIMEOUT, reply).await {
        Ok(result) => result,
        Err(_) => Err(zbus::Error::InputOutput(Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the bus did not answer RequestName within {CALL_TIMEOUT:?}"),
        )))),
    }
}

/// Sends `RequestName` with exactly `flags` (never zbus's defaults, which allow a second copy
/// to steal the name).
pub(crate) async fn request_name(
    conn: &Connection,
    name: &str,
    flags: RequestNameFlags,
) -> zbus::Result<RequestNameReply> {
    conn.call_method(
        Some(DBUS_NAME),
        DBUS_PATH,
        Some(DBUS_NAME),
        "RequestName",
        &(name, flags),
    )
    .await?
    .body()
    .deserialize::<RequestNameReply>()
}

/// Sends `ReleaseName`, which also leaves the queue when we were only waiting: what the bus
/// answered (`NOT_OWNER` or `NON_EXISTENT` when the name was not ours any more).
pub(crate) async fn release_name(
    conn: &Connection,
    name: &str,
) -> zbus::Result<zbus::fdo::ReleaseNameReply> {
    conn.call_method(
        Some(DBUS_NAME),
        DBUS_PATH,
        Some(DBUS_NAME),
        "ReleaseName",
        &(name,),
    )
    .await?
    .body()
    .deserialize::<zbus::fdo::ReleaseNameReply>()
}

/// What the bus knows of the owner of `name`: UID from `GetConnectionCredentials`, the unique
/// name from `GetNameOwner`, asked together; the PID, start time and executable of the process
/// that made the connection, only while it still runs (see [`owner_and_connecting_pid`]).
pub(crate) async fn owner_of(conn: &Connection, name: &str, bus: BusKind) -> Holder {
    owner_and_connecting_pid(conn, name, bus).await.0
}

/// [`owner_of`], or why the bus did not say who owns `name` (its `GetNameOwner` failed, for
/// another reason than `NameHasNoOwner`: a policy that denies it, a bus that stopped answering):
/// then whether the name is owned is not known, and a caller must not take it for free.
pub(crate) async fn owner_of_or_unknown(
    conn: &Connection,
    name: &str,
    bus: BusKind,
) -> std::result::Result<Holder, zbus::Error> {
    let (holder, _, unknown) = owner_and_connecting_pid(conn, name, bus).await;
    match unknown {
        Some(e) => Err(e),
        None => Ok(holder),
    }
}

/// [`owner_of`], the PID the bus gives for the connection, dead or alive, and the error of
/// `GetNameOwner` if it failed otherwise than with `NameHasNoOwner` (see
/// [`owner_of_or_unknown`]).
///
/// `GetConnectionCredentials` gives the PID of the process that *made* the connection. The
/// connection may outlive it: `run`'s keeper holds a duplicate of the wrapper's socket, and the
/// name stays owned after the wrapper is killed. A dead process is never named (a PID that no
/// longer runs, or a zombie): the holder's PID is then unknown, and the lock file's record, when
/// one names a live process on the same connection, tells who holds it (see `status`). Not
/// covered: once the dead process's PID is reused, the bus's answer names the new, unrelated
/// process — dbus-daemon before 1.15 gives no `ProcessFD` that would tell them apart, and no
/// start time.
pub(crate) async fn owner_and_connecting_pid(
    conn: &Connection,
    name: &str,
    bus: BusKind,
) -> (Holder, Option<u32>, Option<zbus::Error>) {
    let args = (name,);
    let creds = conn.call_method(
        Some(DBUS_NAME),
        DBUS_PATH,
        Some(DBUS_NAME),
        "GetConnectionCredentials",
        &args,
    );
    let owner = conn.call_method(
        Some(DBUS_NAME),
        DBUS_PATH,
        Some(DBUS_NAME),
        "GetNameOwner",
        &args,
    );
    let (creds, owner) = tokio::join!(creds, owner);
    let (owner, unknown) = match owner {
        Ok(reply) => (Some(reply), None),
        Err(e) if is_name_has_no_owner(&e) => (None, None),
        Err(e) => (None, Some(e)),
    };
    let creds: HashMap<String, OwnedVariant> = creds
        .ok()
        .and_then(|m| m.body().deserialize().ok())
        .unwrap_or_default();
    let number = |key: &str| creds.get(key).and_then(|v| u32::try_from(v).ok());
    // A bus that cannot tell (a TCP connection) may say 0, which is never a process.
    let connected_by = number("ProcessID").filter(|&pid| pid != 0);
    let pid = connected_by.filter(|&pid| process_is_running(pid));
    let holder = Holder {
        pid,
        uid: number("UnixUserID"),
        since: pid.and_then(process_start_time),
        found_by: Some(Backend::Dbus),
        bus: Some(bus),
        bus_unique_name: owner.and_then(|m| m.body().deserialize::<String>().ok()),
        executable: pid.and_then(process_executable),
        hostname: None,
        lock_file: None,
        queued_on_bus: None,
        queue_place: None,
    };
    (holder, connected_by, unknown)
}

/// Whether the name's owner is the lock's previous holder (`previous_pid`, by its record),
/// dead or exiting, by the PID that made the owner's connection (`connected_by`): the bus has
/// yet to process its disconnect.
fn is_dead_previous(previous_pid: Option<u32>, connected_by: Option<u32>) -> bool {
    previous_pid.is_some_and(|pid| Some(pid) == connected_by)
        && connected_by.is_some_and(|pid| !process_lives_on(pid))
}

/// Is this the bus saying that nobody owns the name asked about?
pub(super) fn is_name_has_no_owner(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::FDO(fdo) if matches!(**fdo, zbus::fdo::Error::NameHasNoOwner(_)))
        || matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner")
}

/// Is this the bus refusing us by policy (as opposed to the name being taken)?
pub(crate) fn is_access_denied(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::FDO(fdo) if matches!(**fdo, zbus::fdo::Error::AccessDenied(_)))
        || matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied")
}
