//! The D-Bus backend: own a well-known name with explicit flags, on one connection, with as few
//! round trips as the protocol allows.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::OwnedVariant;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::Type as MessageType;
use zbus::{Connection, MessageStream};

use crate::holder::{BackendKind, Holder, process_executable, process_start_time};
use crate::scope::BusKind;

const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// How long a method call to the bus daemon may take before we give up on it.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// Connects (authenticates and says `Hello`) to `bus`, honouring `DBUS_SESSION_BUS_ADDRESS` /
/// `DBUS_SYSTEM_BUS_ADDRESS`.
pub(crate) async fn connect(bus: BusKind) -> zbus::Result<Connection> {
    let address = match bus {
        BusKind::Session => zbus::Address::session()?,
        BusKind::System => zbus::Address::system()?,
    };
    // A Unix socket is connected here (a local connect completes at once, or fails with EAGAIN
    // when the bus's backlog is full: then zbus connects as usual) and handed over connected:
    // zbus's own connect waits for the socket to become writable and registers it with the
    // reactor twice, a trip through the event loop (and, on a multi-thread runtime, a wake-up of
    // another thread) before the handshake can start.
    let builder = match unix_connect(&address) {
        Some(Ok(stream)) => zbus::connection::Builder::unix_stream(stream),
        Some(Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e.into()),
        _ => zbus::connection::Builder::address(address.clone()),
    };
    let conn = builder.method_timeout(CALL_TIMEOUT).build().await?;
    // zbus checks the bus's GUID against the address's only when it connects by address.
    if let Some(expected) = address.guid()
        && conn.server_guid().as_str() != expected.as_str()
    {
        return Err(zbus::Error::Handshake(format!(
            "server GUID mismatch: expected {expected}, got {}",
            conn.server_guid()
        )));
    }
    Ok(conn)
}

/// Connects, without blocking, to `address` when it names a Unix socket (a path or an abstract
/// name); `None` for any other transport, which zbus then handles itself.
fn unix_connect(
    address: &zbus::Address,
) -> Option<std::io::Result<std::os::unix::net::UnixStream>> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use zbus::address::transport::{Transport, UnixSocket};
    let Transport::Unix(unix) = address.transport() else {
        return None;
    };
    let target = match unix.path() {
        UnixSocket::File(path) => SocketAddrUnix::new(path.as_path()),
        #[cfg(target_os = "linux")]
        UnixSocket::Abstract(name) => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddrUnix::new_abstract_name(name.as_bytes())
        }
        _ => return None,
    };
    Some((|| {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::connect(&socket, &target?)?;
        Ok(std::os::unix::net::UnixStream::from(socket))
    })())
}

/// A stream of everything the connection receives, opened before `RequestName` so that no
/// `NameAcquired`/`NameLost` can slip past. Those signals are unicast to the owner, so no
/// `AddMatch` round trip is needed (zbus's own `request_name` spends two).
pub(crate) fn signal_stream(conn: &Connection) -> MessageStream {
    MessageStream::from(conn)
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

/// Sends `ReleaseName`, which also leaves the queue when we were only waiting.
pub(crate) async fn release_name(conn: &Connection, name: &str) -> zbus::Result<()> {
    conn.call_method(
        Some(DBUS_NAME),
        DBUS_PATH,
        Some(DBUS_NAME),
        "ReleaseName",
        &(name,),
    )
    .await
    .map(drop)
}

/// What the bus knows of the owner of `name`: PID and UID from `GetConnectionCredentials`, the
/// unique name from `GetNameOwner`, asked together; start time and executable from `/proc`.
pub(crate) async fn owner_of(conn: &Connection, name: &str, bus: BusKind) -> Holder {
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
    let creds: HashMap<String, OwnedVariant> = creds
        .ok()
        .and_then(|m| m.body().deserialize().ok())
        .unwrap_or_default();
    let number = |key: &str| creds.get(key).and_then(|v| u32::try_from(v).ok());
    let pid = number("ProcessID");
    Holder {
        pid,
        uid: number("UnixUserID"),
        since: pid.and_then(process_start_time),
        found_by: Some(BackendKind::Dbus),
        bus: Some(bus),
        bus_unique_name: owner
            .ok()
            .and_then(|m| m.body().deserialize::<String>().ok()),
        executable: pid.and_then(process_executable),
        hostname: None,
        lock_file: None,
    }
}

/// A name-ownership signal about our name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameSignal {
    Acquired,
    Lost,
}

/// Reads the next `NameAcquired`/`NameLost` for `name`; `None` when the connection closed.
pub(crate) async fn next_name_signal(stream: &mut MessageStream, name: &str) -> Option<NameSignal> {
    while let Some(item) = stream.next().await {
        let Ok(msg) = item else { continue };
        if msg.message_type() != MessageType::Signal {
            continue;
        }
        let header = msg.header();
        if header.sender().map(|s| s.as_str()) != Some(DBUS_NAME)
            || header.interface().map(|i| i.as_str()) != Some(DBUS_NAME)
        {
            continue;
        }
        let signal = match header.member().map(|m| m.as_str()) {
            Some("NameAcquired") => NameSignal::Acquired,
            Some("NameLost") => NameSignal::Lost,
            _ => continue,
        };
        if msg.body().deserialize::<&str>().ok() == Some(name) {
            return Some(signal);
        }
    }
    None
}

/// Is this the bus refusing us by policy (as opposed to the name being taken)?
pub(crate) fn is_access_denied(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::FDO(fdo) if matches!(**fdo, zbus::fdo::Error::AccessDenied(_)))
        || matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied")
}
