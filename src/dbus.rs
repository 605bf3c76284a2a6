//! The D-Bus backend: own a well-known name with explicit flags, on one connection, with as few
//! round trips as the protocol allows.

mod socket;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::OwnedVariant;
use zbus::connection::Builder;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::Type as MessageType;
use zbus::{Connection, Message, MessageStream};

use crate::holder::{BackendKind, Holder, process_executable, process_start_time};
use crate::scope::BusKind;

const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// How long a method call to the bus daemon may take before we give up on it.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// Something to serve on the connection, registered with the builder so that it is in place
/// before the connection reads its first message.
pub(crate) type Export = Box<dyn FnOnce(Builder<'static>) -> Builder<'static> + Send>;

/// A connection to the bus, with the stream of everything it receives (set up before zbus read
/// anything, so no `NameAcquired`/`NameLost` or reply can slip past).
pub(crate) struct Connected {
    pub(crate) conn: Connection,
    pub(crate) stream: MessageStream,
    /// The serial of the `RequestName` call sent with the handshake, whose reply is to be read
    /// from `stream` (see [`request_name_reply`]); `None` when it was not sent.
    pub(crate) pending_request: Option<NonZeroU32>,
}

/// Connects (authenticates and says `Hello`) to `bus`, honouring `DBUS_SESSION_BUS_ADDRESS` /
/// `DBUS_SYSTEM_BUS_ADDRESS`, with `exports` served from the start. With `request`, the
/// `RequestName` call goes out in the same write as the handshake where the transport allows it
/// (a Unix socket): one round trip to the bus instead of two.
pub(crate) async fn connect(
    bus: BusKind,
    exports: Vec<Export>,
    request: Option<(&str, RequestNameFlags)>,
) -> zbus::Result<Connected> {
    let address = match bus {
        BusKind::Session => zbus::Address::session()?,
        BusKind::System => zbus::Address::system()?,
    };
    let request = request
        .map(|(name, flags)| {
            Message::method_call(DBUS_PATH, "RequestName")
                .destination(DBUS_NAME)
                .interface(DBUS_NAME)
                .build(&(name, flags))
        })
        .transpose()?;
    let appended = Arc::new(AtomicBool::new(false));
    // A Unix socket is connected here (a local connect completes at once, or fails with EAGAIN
    // when the bus's backlog is full: then zbus connects as usual) and driven through our
    // socket halves, which append `RequestName` to the handshake. zbus's own connect would also
    // wait a turn of the event loop for the socket to become writable.
    let mut builder = match unix_connect(&address) {
        Some(Ok(stream)) => {
            let stream = tokio::net::UnixStream::from_std(stream)?;
            let append = request.as_ref().map(|m| m.data().to_vec());
            Builder::socket(socket::halves(stream, append, Arc::clone(&appended)))
        }
        Some(Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e.into()),
        _ => Builder::address(address.clone()),
    };
    for export in exports {
        builder = export(builder);
    }
    let stream = builder
        .method_timeout(CALL_TIMEOUT)
        .build_message_stream()
        .await?;
    let conn = Connection::from(&stream);
    // zbus checks the bus's GUID against the address's only when it connects by address.
    if let Some(expected) = address.guid()
        && conn.server_guid().as_str() != expected.as_str()
    {
        return Err(zbus::Error::Handshake(format!(
            "server GUID mismatch: expected {expected}, got {}",
            conn.server_guid()
        )));
    }
    let pending_request = request
        .filter(|_| appended.load(Ordering::Acquire))
        .map(|m| m.primary_header().serial_num());
    Ok(Connected {
        conn,
        stream,
        pending_request,
    })
}

/// Reads the reply to the `RequestName` call with `serial` from `stream`. Other messages read
/// meanwhile are only our own `NameAcquired` signals, which the reply makes redundant (the bus
/// sends them just before it).
pub(crate) async fn request_name_reply(
    stream: &mut MessageStream,
    serial: NonZeroU32,
) -> zbus::Result<RequestNameReply> {
    let reply = async {
        while let Some(item) = stream.next().await {
            let Ok(msg) = item else { continue };
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
    // A bus that cannot tell (a TCP connection) may say 0, which is never a process.
    let pid = number("ProcessID").filter(|&pid| pid != 0);
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
