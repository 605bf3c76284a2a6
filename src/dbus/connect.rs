//! Connecting to the bus: the handshake (with `RequestName` in the same write where the
//! transport allows it, see `socket`), the objects served from the start, and the descriptor
//! that ends the connection without zbus.
//! It must not decide anything about the name (that is `name`).

use std::num::NonZeroU32;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::connection::Builder;
use zbus::fdo::RequestNameFlags;
use zbus::{Connection, Message, MessageStream};

use super::{CALL_TIMEOUT, DBUS_NAME, DBUS_PATH, socket};
use crate::scope::BusKind;

/// How long connecting (authentication and `Hello`) may take before the bus is taken for
/// unreachable. A local bus answers in a millisecond; a bus that has not answered in this long
/// is stopped or stuck, and the lock file alone enforces exclusion meanwhile (or, with the D-Bus
/// backend alone, there is no usable backend).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Something to serve on the connection, registered with the builder so that it is in place
/// before the connection reads its first message. `Sync` too (zbus interfaces are), so that
/// `&InstanceOptions` may be held across an await in a `Send` future.
pub(crate) type Export = Box<dyn FnOnce(Builder<'static>) -> Builder<'static> + Send + Sync>;

/// A connection to the bus, with the messages the bus itself sends it (taken from a stream set up
/// before zbus read anything, so no `NameAcquired`/`NameLost` or reply can slip past).
pub(crate) struct Connected {
    pub(crate) conn: Connection,
    pub(crate) stream: BusMessages,
    /// The serial of the `RequestName` call sent with the handshake, whose reply is to be read
    /// from `stream` (see [`request_name_reply`]); `None` when it was not sent.
    pub(crate) pending_request: Option<NonZeroU32>,
    /// Ends the connection on drop, unless disarmed; `None` on transports zbus connected itself
    /// (neither a Unix socket nor plain TCP: `nonce-tcp:`, `unixexec:`).
    pub(crate) disconnect: Option<Disconnect>,
}

/// How many received messages zbus keeps for its readers (its default is 64) before it reads no
/// more: each keeps the file descriptors it came with open until every reader has had it. A
/// peer's messages may carry 16 each (more on some buses), and 64 of them filled a table of
/// 1024 (see [`BusMessages`]); with our readers quick to take them, a few is all it takes. A
/// program that has much traffic on [`InstanceGuard::connection`](crate::InstanceGuard::connection)
/// may raise it (`Connection::set_max_queued` on a clone).
const MAX_QUEUED: std::num::NonZeroUsize = std::num::NonZeroUsize::new(4).unwrap();

/// How many of the bus's own messages wait for their reader (see [`BusMessages`]): the bus
/// sends us only answers to our calls and the signals about our names, a handful.
const BUS_MESSAGES_QUEUED: usize = 64;

/// How long the pump waits for the bus to drop a connection whose reader stopped (see
/// [`BusMessages::pump`]); a bus that is there does it in a millisecond.
const READER_END_TIMEOUT: Duration = Duration::from_secs(1);

/// The messages the bus itself sends (sender `org.freedesktop.DBus`: our names' signals, the
/// answer to the `RequestName` sent with the handshake), read off the connection's stream of
/// everything by a task of their own, which drops every other message at once.
///
/// A review: a catch-all stream that is read only now and then (not at all while a copy waits
/// for the lock file, with its connection made ahead) is filled by any peer's unicast signals:
/// zbus keeps 64 messages per stream, then stops reading the socket, so the `RequestName`
/// reply was never read and the copy ran without the name; and messages that carry file
/// descriptors kept up to 64 × 16 of them open, filling a 1024-descriptor table, after which
/// the kernel truncates the next message's and the connection is closed: a false loss any
/// peer could cause. Dropped at once, a peer's message and its descriptors cost nothing.
pub(crate) struct BusMessages {
    received: tokio::sync::mpsc::Receiver<Message>,
    /// Aborted on drop: nothing reads the connection for us once we stop listening.
    pump: tokio::task::JoinHandle<()>,
}

impl BusMessages {
    /// Starts reading `stream` (on the runtime we are in, the connection's). When it ends, the
    /// connection is ended through `socket` (the [`Disconnect`]'s duplicate, while it lives)
    /// before the end is seen by our reader.
    fn pump(mut stream: MessageStream, socket: Option<Weak<OwnedFd>>) -> Self {
        let (sender, received) = tokio::sync::mpsc::channel(BUS_MESSAGES_QUEUED);
        let pump = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let Ok(message) = item else { continue };
                let from_the_bus =
                    message.header().sender().map(|s| s.as_str()) == Some(super::DBUS_NAME);
                // Anyone else's is dropped here, with its descriptors.
                if from_the_bus && sender.send(message).await.is_err() {
                    return;
                }
            }
            // zbus's reader ended. The bus may still be there: zbus ends its reader on any
            // message it cannot read, and marks the connection closed without shutting the
            // socket down, so the bus would go on listing us as the name's owner, on a
            // connection nobody reads. End it for real, and wait (briefly) until the bus has
            // dropped it, before the end is told (the `sender` dropped with this task): a loss
            // then means the name is free, and the lock file's re-check is what holds.
            if let Some(socket) = socket.as_ref().and_then(Weak::upgrade) {
                let ended =
                    tokio::task::spawn_blocking(move || end_and_wait(&socket, READER_END_TIMEOUT))
                        .await;
                if let Ok(Err(e)) = ended {
                    tracing::debug!(error = %e, "ending a connection whose reader stopped");
                }
            }
            drop(sender);
        });
        BusMessages { received, pump }
    }

    /// The next message from the bus; `None` once the connection is closed.
    pub(crate) async fn next(&mut self) -> Option<Message> {
        self.received.recv().await
    }
}

impl Drop for BusMessages {
    fn drop(&mut self) {
        self.pump.abort();
    }
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
    /// Shared (weakly) with the pump of [`BusMessages`], which ends the connection when zbus's
    /// reader stops; dropping this closes the descriptor all the same.
    socket: Option<Arc<OwnedFd>>,
    /// A Unix socket, the one kind handed out ([`Disconnect::socket`]): on TCP a duplicate
    /// only ends the connection.
    unix: bool,
}

impl Disconnect {
    /// Keeps a duplicate of `socket`'s descriptor (one system call), handed out only if `unix`.
    fn of(socket: impl std::os::fd::AsFd, unix: bool) -> std::io::Result<Self> {
        Ok(Disconnect {
            socket: Some(Arc::new(rustix::io::fcntl_dupfd_cloexec(socket, 0)?)),
            unix,
        })
    }

    /// The duplicate of the bus socket's descriptor, until the connection was ended or this was
    /// disarmed.
    pub(crate) fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.socket
            .as_ref()
            .filter(|_| self.unix)
            .map(|socket| std::os::fd::AsFd::as_fd(&**socket))
    }

    /// The duplicate, for the pump of [`BusMessages`], without keeping it open.
    fn weak(&self) -> Option<Weak<OwnedFd>> {
        self.socket.as_ref().map(Arc::downgrade)
    }

    /// Keeps the connection when dropped (its socket closes with zbus's tasks, as usual).
    pub(crate) fn disarm(mut self) {
        self.socket = None;
    }

    /// Whether the connection was over before we ended it: the bus closed it (it died, or
    /// dropped us), or our pump shut it down as zbus's reader stopped. Then any name it owned
    /// was lost before, not by, the release. Looked at without waiting, and without reading.
    pub(crate) fn closed_by_the_bus(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let Some(socket) = &self.socket else {
            return false;
        };
        let mut fds = [PollFd::new(&**socket, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&now)).is_ok()
            && fds[0]
                .revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
    }

    /// Ends the connection and waits until the bus has closed its side, at most `timeout`: the
    /// bus then processed our disconnection, so it released our names (and answers anyone who
    /// asks after that accordingly). Needs no runtime.
    pub(crate) fn wait(mut self, timeout: Duration) -> std::io::Result<()> {
        match self.socket.take() {
            Some(socket) => end_and_wait(&socket, timeout),
            None => Ok(()),
        }
    }
}

/// Ends the connection of `socket` and waits until the bus has closed its side, at most
/// `timeout` (see [`Disconnect::wait`]).
fn end_and_wait(socket: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    use rustix::io::Errno;
    // Our side first: the bus reads end-of-file and drops us. Not reading any more, this
    // connection's remaining messages are discarded below.
    match rustix::net::shutdown(socket, rustix::net::Shutdown::Write) {
        Ok(()) | Err(Errno::NOTCONN) => {}
        Err(e) => return Err(e.into()),
    }
    let deadline = std::time::Instant::now().checked_add(timeout);
    let mut buf = [0u8; 4096];
    loop {
        match rustix::net::recv(socket, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
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
        let mut fds = [PollFd::new(socket, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Whatever zbus's tasks still hold of the socket, the connection is over.
    let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
    Ok(())
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
pub(super) async fn connect_to(
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
            disconnect = Some(Disconnect::of(&stream, true)?);
            let stream = tokio::net::UnixStream::from_std(stream)?;
            let append = request.as_ref().map(|m| m.data().to_vec());
            Builder::socket(socket::halves(stream, append, Arc::clone(&appended)))
        }
        Some(Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e.into()),
        _ => match tcp_connect(&address).await {
            // Ours too, so that a release ends the connection without zbus's tasks (see
            // `Disconnect`): a name released from an idle runtime is free when it returns.
            Some(stream) => {
                let stream = stream?;
                disconnect = Some(Disconnect::of(&stream, false)?);
                Builder::tcp_stream(stream)
            }
            None => Builder::address(address.clone()),
        },
    };
    for export in exports {
        builder = export(builder);
    }
    let stream = builder
        .method_timeout(CALL_TIMEOUT)
        .max_queued(MAX_QUEUED)
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
        stream: BusMessages::pump(stream, disconnect.as_ref().and_then(Disconnect::weak)),
        pending_request,
        disconnect,
    })
}

/// Connects to `address` when it names a plain TCP transport (`tcp:host=...,port=...`, with its
/// `family`), trying each address the host resolves to in turn; `None` for any other transport
/// (`nonce-tcp:` among them), which zbus then handles itself.
async fn tcp_connect(address: &zbus::Address) -> Option<std::io::Result<std::net::TcpStream>> {
    use zbus::address::transport::{TcpTransportFamily, Transport};
    let Transport::Tcp(tcp) = address.transport() else {
        return None;
    };
    if tcp.nonce_file().is_some() {
        return None;
    }
    let family = tcp.family();
    Some(
        async {
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no address found for the bus's host {:?}", tcp.host()),
            );
            for at in tokio::net::lookup_host((tcp.host(), tcp.port())).await? {
                let wanted = match family {
                    Some(TcpTransportFamily::Ipv4) => at.is_ipv4(),
                    Some(TcpTransportFamily::Ipv6) => at.is_ipv6(),
                    _ => true,
                };
                if !wanted {
                    continue;
                }
                match tokio::net::TcpStream::connect(at).await {
                    Ok(stream) => return stream.into_std(),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        .await,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// zbus's reader stops (here on bytes that are no message) while our socket is connected:
    /// the bus sees the connection end (so it frees our names) before our reader of the bus's
    /// messages sees their end (which the watch reports as a loss).
    #[test]
    fn a_stopped_reader_ends_the_connection_before_the_end_is_told() {
        use std::io::{Read, Write};
        let (client, mut server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let fake_bus = std::thread::spawn(move || {
            super::super::socket::tests::read_until_begin(&mut server);
            let mut garbage = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n".to_vec();
            // No byte order: not a message.
            garbage.extend(b"x\x04\x00\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00");
            server.write_all(&garbage).expect("write");
            server
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // Until the client's end of file (an error if it never comes).
            let mut buf = [0u8; 256];
            let ended = loop {
                match server.read(&mut buf) {
                    Ok(0) => break Ok(std::time::Instant::now()),
                    Ok(_) => continue,
                    Err(e) => break Err(e),
                }
            };
            // As a bus does, once it has dropped the connection.
            drop(server);
            ended
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let told = rt.block_on(async {
            client.set_nonblocking(true).expect("nonblocking");
            let disconnect = Disconnect::of(&client, true).expect("duplicate");
            let client = tokio::net::UnixStream::from_std(client).expect("tokio");
            let halves = socket::halves(client, None, Arc::new(AtomicBool::new(false)));
            let stream = Builder::socket(halves)
                .p2p()
                .build_message_stream()
                .await
                .expect("connection");
            // zbus's own handle, kept: it never closes the socket by itself.
            let _conn = Connection::from(&stream);
            let mut messages = BusMessages::pump(stream, disconnect.weak());
            assert!(messages.next().await.is_none(), "a message from garbage");
            let told = std::time::Instant::now();
            drop(disconnect);
            told
        });
        let ended = fake_bus
            .join()
            .expect("fake bus")
            .expect("the connection was never ended");
        assert!(ended <= told, "the end was told before the bus saw it");
    }
}
