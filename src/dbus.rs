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

/// How long connecting (authentication and `Hello`) may take before the bus is taken for
/// unreachable. A local bus answers in a millisecond; a bus that has not answered in this long
/// is stopped or stuck, and the lock file alone enforces exclusion meanwhile (or, with the D-Bus
/// backend alone, there is no usable backend).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Something to serve on the connection, registered with the builder so that it is in place
/// before the connection reads its first message. `Sync` too (zbus interfaces are), so that
/// `&InstanceOptions` may be held across an await in a `Send` future.
pub(crate) type Export = Box<dyn FnOnce(Builder<'static>) -> Builder<'static> + Send + Sync>;

/// A connection to the bus, with the stream of everything it receives (set up before zbus read
/// anything, so no `NameAcquired`/`NameLost` or reply can slip past).
pub(crate) struct Connected {
    pub(crate) conn: Connection,
    pub(crate) stream: MessageStream,
    /// The serial of the `RequestName` call sent with the handshake, whose reply is to be read
    /// from `stream` (see [`request_name_reply`]); `None` when it was not sent.
    pub(crate) pending_request: Option<NonZeroU32>,
    /// Ends the connection on drop, unless disarmed; `None` on transports zbus connected itself.
    pub(crate) disconnect: Option<Disconnect>,
}

/// A duplicate of the bus socket's descriptor, to end the connection without zbus.
///
/// zbus closes a connection's socket from its own tasks, on the runtime that made it: a
/// connection dropped while that runtime is idle, or blocked in the drop, stays open, and with
/// it every name it owns and every queue it waits in. Shutting the socket down through this
/// duplicate makes the bus drop the connection, its names and its queue entries at once,
/// whatever runtime runs or does not. Until [`Disconnect::disarm`], dropping it does that: so
/// an acquisition that is cancelled, or fails, keeps nothing on the bus.
#[derive(Debug)]
pub(crate) struct Disconnect {
    socket: Option<std::os::fd::OwnedFd>,
}

impl Disconnect {
    /// Keeps the connection when dropped (its socket closes with zbus's tasks, as usual).
    pub(crate) fn disarm(mut self) {
        self.socket = None;
    }

    /// Ends the connection and waits until the bus has closed its side, at most `timeout`: the
    /// bus then processed our disconnection, so it released our names (and answers anyone who
    /// asks after that accordingly). Needs no runtime.
    pub(crate) fn wait(mut self, timeout: Duration) -> std::io::Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        use rustix::io::Errno;
        let Some(socket) = self.socket.take() else {
            return Ok(());
        };
        // Our side first: the bus reads end-of-file and drops us. Not reading any more, this
        // connection's remaining messages are discarded below.
        match rustix::net::shutdown(&socket, rustix::net::Shutdown::Write) {
            Ok(()) | Err(Errno::NOTCONN) => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = std::time::Instant::now().checked_add(timeout);
        let mut buf = [0u8; 4096];
        loop {
            match rustix::net::recv(&socket, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) | Err(Errno::CONNRESET | Errno::NOTCONN) => break,
                Ok(_) | Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            let left = deadline.map_or(timeout, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the bus did not close the connection within {timeout:?}"),
                ));
            }
            let ts = Timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&socket, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Whatever zbus's tasks still hold of the socket, the connection is over.
        let _ = rustix::net::shutdown(&socket, rustix::net::Shutdown::Both);
        Ok(())
    }
}

impl Drop for Disconnect {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            let _ = rustix::net::shutdown(&socket, rustix::net::Shutdown::Both);
        }
    }
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
    // zbus puts no bound on the handshake (its method timeout covers calls only), so a bus that
    // accepts the connection but never answers (stopped, frozen, deadlocked) would hang every
    // copy. Dropping the unfinished connection shuts its socket down (see `Disconnect`).
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_to(address, exports, request)).await {
        Ok(connected) => connected,
        Err(_) => Err(zbus::Error::InputOutput(Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the {bus} bus did not complete the connection within {CONNECT_TIMEOUT:?}"),
        )))),
    }
}

/// [`connect`] to `address`.
async fn connect_to(
    address: zbus::Address,
    exports: Vec<Export>,
    request: Option<(&str, RequestNameFlags)>,
) -> zbus::Result<Connected> {
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
    let mut disconnect = None;
    let mut builder = match unix_connect(&address) {
        Some(Ok(stream)) => {
            // One system call; see `Disconnect` for what it buys.
            disconnect = Some(Disconnect {
                socket: Some(
                    rustix::io::fcntl_dupfd_cloexec(&stream, 0).map_err(std::io::Error::from)?,
                ),
            });
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
        disconnect,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A private `dbus-daemon` for unit tests, killed on drop.
    pub(crate) struct PrivateBus {
        child: std::process::Child,
        pub(crate) address: zbus::Address,
        _dir: std::path::PathBuf,
    }

    impl PrivateBus {
        pub(crate) fn start() -> Self {
            use std::io::BufRead;
            static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "unique-instance-unit-bus-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::create_dir_all(&dir);
            let mut child = std::process::Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address=1"])
                .arg(format!("--address=unix:dir={}", dir.display()))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("`dbus-daemon` is needed: apt-get install -y dbus");
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("address");
            let address = line.trim().parse().expect("bus address");
            PrivateBus {
                child,
                address,
                _dir: dir,
            }
        }

        pub(crate) fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Connects, owning `name` when given.
        pub(crate) async fn connect(&self, name: Option<&str>) -> Connected {
            let mut connected = connect_to(
                self.address.clone(),
                Vec::new(),
                name.map(|n| (n, RequestNameFlags::DO_NOT_QUEUE)),
            )
            .await
            .expect("connect");
            if let Some(serial) = connected.pending_request {
                let reply = request_name_reply(&mut connected.stream, serial)
                    .await
                    .expect("RequestName");
                assert_eq!(reply, RequestNameReply::PrimaryOwner);
            }
            connected
        }

        pub(crate) async fn has_owner(&self, name: &str) -> bool {
            let other = self.connect(None).await;
            other
                .conn
                .call_method(
                    Some(DBUS_NAME),
                    DBUS_PATH,
                    Some(DBUS_NAME),
                    "NameHasOwner",
                    &(name,),
                )
                .await
                .expect("NameHasOwner")
                .body()
                .deserialize::<bool>()
                .expect("reply")
        }
    }

    impl Drop for PrivateBus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }

    /// Our own socket halves report the bus's credentials from the kernel, as zbus's do.
    #[tokio::test]
    async fn our_socket_knows_the_bus_credentials() {
        let bus = PrivateBus::start();
        let connected = bus.connect(None).await;
        assert!(connected.disconnect.is_some(), "not our own socket");
        let creds = connected.conn.peer_creds().await.expect("peer_creds");
        assert_eq!(creds.process_id(), Some(bus.pid()));
        assert_eq!(
            creds.unix_user_id(),
            Some(rustix::process::getuid().as_raw())
        );
    }

    /// `Disconnect::wait` returns once the bus dropped us: the name is free by then, while
    /// the runtime that owns the connection does not run.
    #[test]
    fn a_disconnect_frees_the_name_without_the_runtime() {
        let bus = PrivateBus::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let name = "org.uniqueinstance.Unit.Disconnect";
        let connected = rt.block_on(bus.connect(Some(name)));
        let disconnect = connected.disconnect.expect("our own socket");
        disconnect.wait(Duration::from_secs(5)).expect("disconnect");
        let checker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert!(!checker.block_on(bus.has_owner(name)));
        drop(connected.conn);
    }
}
