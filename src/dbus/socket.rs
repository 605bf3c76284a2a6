//! The bus socket as zbus sees it, so that `RequestName` can go out in the same write as the
//! handshake and `Hello`.
//!
//! zbus already sends its whole client handshake (`AUTH`, `NEGOTIATE_UNIX_FD`, `BEGIN`) and the
//! `Hello` call in one write. Our write half appends the `RequestName` call to that write, so a
//! fresh instance needs one round trip to the bus instead of two; the bus handles messages in
//! order, so `RequestName` is handled right after `Hello`, as if we had waited. The reply is read
//! from a message stream set up before zbus starts reading (`build_message_stream`).
//!
//! The read half frames what comes in (see `frame`): a peer's message that zbus cannot read
//! (a header field code it does not know) would end zbus's reader, and with it our connection
//! and name; it is dropped here instead, with its descriptors.
//!
//! Otherwise the halves are a plain Unix socket driven by tokio: bytes and file descriptors
//! (`SCM_RIGHTS`) in and out, as zbus's own socket does.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, Shutdown,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use zbus::connection::socket::{BoxedSplit, ReadHalf, Split, WriteHalf};
use zbus::fdo::ConnectionCredentials;

use super::frame;

/// The most descriptors one message may carry (as zbus allows).
const MAX_FDS: usize = 1024;

/// Splits `stream` into the halves zbus drives. `append`, if any, is sent right after the first
/// write that ends the handshake with `BEGIN` and a whole message (the `Hello` call); `appended`
/// tells whether that happened.
pub(super) fn halves(
    stream: UnixStream,
    append: Option<Vec<u8>>,
    appended: Arc<AtomicBool>,
) -> BoxedSplit {
    let stream = Arc::new(stream);
    Split::new(
        Box::new(Reader {
            stream: Arc::clone(&stream),
            pending: Vec::new(),
            start: 0,
            end: 0,
            fds: VecDeque::new(),
            messages: false,
            mid_line: false,
            header: Vec::new(),
            header_at: 0,
            message_fds: Vec::new(),
            left: 0,
            dropping: false,
        }),
        Box::new(Writer {
            stream,
            append,
            appended,
        }),
    )
}

/// The read half: hands zbus the handshake's lines as they come, then whole messages only as
/// [`frame::judge`] allows (see the `frame` module): a peer's message that zbus could not read
/// is dropped here with exactly its descriptors, and never reaches zbus to end the connection.
///
/// zbus asks for a message's 16 fixed bytes, then for the rest: both are served from what was
/// read ahead (`pending`), a body that was not read yet straight from the socket into zbus's
/// buffer. A message's descriptors go with its first bytes, so zbus gives each message its own.
#[derive(Debug)]
struct Reader {
    stream: Arc<UnixStream>,
    /// Read off the socket, not handed on yet: `pending[start..end]` (the rest is room, zeroed
    /// once, so that reading ahead costs no clearing).
    pending: Vec<u8>,
    start: usize,
    end: usize,
    /// Descriptors received and not yet given to their message, in the order they came.
    fds: VecDeque<OwnedFd>,
    /// Past the handshake: messages from here on.
    messages: bool,
    /// In the handshake, the last line handed on is not whole yet.
    mid_line: bool,
    /// The rewritten header of the current message (the bus's own, stripped), to hand on first.
    header: Vec<u8>,
    header_at: usize,
    /// The current message's descriptors, handed on with its first bytes.
    message_fds: Vec<OwnedFd>,
    /// How many bytes of the current message are still to hand on (or to drop, if `dropping`)
    /// after `header`, from `pending` and then from the socket.
    left: usize,
    dropping: bool,
}

/// How much is read off the socket at a time ahead of what zbus asked for.
const READ_AHEAD: usize = 16 * 1024;

#[derive(Debug)]
struct Writer {
    stream: Arc<UnixStream>,
    append: Option<Vec<u8>>,
    appended: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        if buf.is_empty() {
            return Ok((0, Vec::new()));
        }
        loop {
            if !self.messages {
                if self.available() == 0 {
                    self.fill(1).await?;
                }
                let n = handshake_lines(&self.pending[self.start..self.end], self.mid_line);
                if n == 0 {
                    // A message's first byte where a line would start: the server's lines are
                    // over (it sends none after `BEGIN`).
                    self.messages = true;
                    continue;
                }
                let n = self.hand_pending(buf, n);
                self.mid_line = self.pending[self.start - 1] != b'\n';
                return Ok((n, Vec::new()));
            }
            if self.header_at < self.header.len() {
                let n = (self.header.len() - self.header_at).min(buf.len());
                buf[..n].copy_from_slice(&self.header[self.header_at..self.header_at + n]);
                self.header_at += n;
                let more = self.hand_pending(&mut buf[n..], self.left.min(self.available()));
                self.left -= more;
                return Ok((n + more, std::mem::take(&mut self.message_fds)));
            }
            if self.left > 0 {
                if self.dropping {
                    let n = self.left.min(self.available());
                    self.start += n;
                    self.left -= n;
                    if self.left > 0 {
                        self.fill(1).await?;
                    }
                    continue;
                }
                let fds = std::mem::take(&mut self.message_fds);
                if self.available() > 0 {
                    let n = self.hand_pending(buf, self.left.min(self.available()));
                    self.left -= n;
                    return Ok((n, fds));
                }
                // A body not read yet: straight into zbus's buffer, no further than its end.
                let want = self.left.min(buf.len());
                let (n, more) = self.read_some(&mut buf[..want]).await?;
                self.fds.extend(more);
                self.left -= n;
                return Ok((n, fds));
            }
            self.next_message().await?;
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        peer_credentials(self.stream.as_fd())
    }
}

impl Reader {
    fn available(&self) -> usize {
        self.end - self.start
    }

    /// Copies up to `n` pending bytes into `buf`; how many.
    fn hand_pending(&mut self, buf: &mut [u8], n: usize) -> usize {
        let n = n.min(buf.len()).min(self.available());
        buf[..n].copy_from_slice(&self.pending[self.start..self.start + n]);
        self.start += n;
        n
    }

    /// Reads until at least `n` bytes are pending.
    async fn fill(&mut self, n: usize) -> io::Result<()> {
        if self.available() >= n {
            return Ok(());
        }
        self.pending.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let room = n.max(READ_AHEAD);
        if self.pending.len() > room && self.end <= READ_AHEAD {
            // A large header is gone: give its room back.
            self.pending.truncate(room);
            self.pending.shrink_to_fit();
        }
        if self.pending.len() < room {
            self.pending.resize(room, 0);
        }
        while self.end < n {
            let (got, fds) = read_from(&self.stream, &mut self.pending[self.end..]).await?;
            self.end += got;
            self.fds.extend(fds);
        }
        Ok(())
    }

    async fn read_some(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        read_from(&self.stream, buf).await
    }

    /// Reads the next message's header and decides what becomes of the message.
    async fn next_message(&mut self) -> io::Result<()> {
        self.fill(frame::FIXED).await?;
        let fixed: [u8; frame::FIXED] = self.pending[self.start..self.start + frame::FIXED]
            .try_into()
            .map_err(|_| io::Error::other("a short fixed header"))?;
        let (header_len, body_len) = frame::lengths(&fixed)?;
        self.fill(header_len).await?;
        let header = &self.pending[self.start..self.start + header_len];
        // The common case, a message zbus reads, costs a walk of its header and no copy.
        let (fds, left, dropping) = match frame::judge(header)? {
            frame::Verdict::Pass { fds } => (fds, header_len + body_len, false),
            frame::Verdict::Drop { fds } => {
                tracing::debug!("dropped a peer's message with a header field zbus cannot read");
                (fds, header_len + body_len, true)
            }
            frame::Verdict::Strip { header, fds } => {
                self.header = header;
                self.header_at = 0;
                self.start += header_len;
                (fds, body_len, false)
            }
        };
        let fds = fds.min(self.fds.len());
        let taken: Vec<OwnedFd> = self.fds.drain(..fds).collect();
        // A dropped message's descriptors close here.
        self.message_fds = if dropping { Vec::new() } else { taken };
        self.left = left;
        self.dropping = dropping;
        Ok(())
    }
}

/// How many bytes at the start of `bytes` are the server's handshake lines (or a line's start),
/// up to where a message begins (`l` or `B`, which no server command starts with) at the start
/// of a line. `mid_line`: `bytes` start within a line (the rest of one handed on in part).
fn handshake_lines(bytes: &[u8], mid_line: bool) -> usize {
    let mut n = 0;
    while n < bytes.len() && (mid_line && n == 0 || !matches!(bytes[n], b'l' | b'B')) {
        match bytes[n..].iter().position(|&b| b == b'\n') {
            Some(end) => n += end + 1,
            None => n = bytes.len(),
        }
    }
    n
}

/// Reads what is there (waiting until something is) into `buf`.
async fn read_from(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || receive(stream.as_fd(), buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

#[async_trait::async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if self.append.is_some() && ends_handshake(buf) {
            let mut all = buf.to_vec();
            all.extend(self.append.take().unwrap_or_default());
            self.send_all(&all, fds).await?;
            self.appended.store(true, Ordering::Release);
            return Ok(buf.len());
        }
        self.send_some(buf, fds).await
    }

    async fn close(&mut self) -> io::Result<()> {
        match rustix::net::shutdown(self.stream.as_fd(), Shutdown::Both) {
            // Already gone: nothing left to close.
            Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        peer_credentials(self.stream.as_fd())
    }
}

/// The bus's credentials, from the kernel (`SO_PEERCRED`), as zbus's own Unix socket reports
/// them (`Connection::peer_credentials`).
fn peer_credentials(fd: BorrowedFd<'_>) -> io::Result<ConnectionCredentials> {
    // As zbus's own Unix socket reads them.
    let cred = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(ConnectionCredentials::default()
        .set_process_id(cred.pid.as_raw_nonzero().get().unsigned_abs())
        .set_unix_user_id(cred.uid.as_raw())
        .add_unix_group_id(cred.gid.as_raw()))
}

impl Writer {
    async fn send_some(&self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        // Tried at once: a fresh socket has room, but tokio learns that only from the event
        // loop, and waiting for it would cost the handshake a turn of the loop.
        match send(self.stream.as_fd(), buf, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
        loop {
            self.stream.writable().await?;
            match self
                .stream
                .try_io(Interest::WRITABLE, || send(self.stream.as_fd(), buf, fds))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    async fn send_all(&self, mut buf: &[u8], mut fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.send_some(buf, fds).await?;
            buf = &buf[n..];
            // Descriptors travel with the first byte they were sent with.
            fds = &[];
        }
        Ok(())
    }
}

/// Does `buf` end the client handshake: `BEGIN\r\n` followed by exactly one whole message?
fn ends_handshake(buf: &[u8]) -> bool {
    const BEGIN: &[u8] = b"BEGIN\r\n";
    let Some(at) = buf.windows(BEGIN.len()).position(|w| w == BEGIN) else {
        return false;
    };
    message_len(&buf[at + BEGIN.len()..]).is_some_and(|len| len == buf.len() - at - BEGIN.len())
}

/// The length of the D-Bus message at the start of `bytes`, from its fixed header: 16 bytes,
/// then the header fields (their length at offset 12) padded to 8, then the body (its length at
/// offset 4).
pub(super) fn message_len(bytes: &[u8]) -> Option<usize> {
    let word = |at: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        match bytes.first()? {
            b'l' => Some(u32::from_le_bytes(b)),
            b'B' => Some(u32::from_be_bytes(b)),
            _ => None,
        }
    };
    let body = word(4)? as usize;
    let fields = word(12)? as usize;
    Some((16 + fields).next_multiple_of(8) + body)
}

fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    receive_with(fd, buf, &mut space)
}

/// [`receive`], with `space` for the control data.
fn receive_with(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    space: &mut [MaybeUninit<u8>],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut ancillary = RecvAncillaryBuffer::new(space);
    let received = rustix::net::recvmsg(
        fd,
        &mut [IoSliceMut::new(buf)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        // Descriptors were sent that did not fit (the kernel closed them): the message they came
        // with would be read without them. Never pass that on as if whole.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the bus sent more file descriptors than one message may carry",
        ));
    }
    if received.bytes == 0 && !buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the bus closed the connection",
        ));
    }
    let mut fds = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok((received.bytes, fds))
}

fn send(fd: BorrowedFd<'_>, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.is_empty() {
        return Ok(rustix::net::send(fd, buf, SendFlags::NOSIGNAL)?);
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many file descriptors for one message",
        ));
    }
    Ok(rustix::net::sendmsg(
        fd,
        &[IoSlice::new(buf)],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A fake bus's side of the client's handshake: everything up to its `BEGIN`.
    pub(in crate::dbus) fn read_until_begin(server: &mut std::os::unix::net::UnixStream) {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"BEGIN\r\n") {
            let n = server.read(&mut buf).expect("read");
            assert!(n > 0, "the client left");
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn descriptors_that_do_not_fit_are_an_error_not_a_message_without_them() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (r, w) = std::io::pipe().expect("pipe");
        let many = [r.as_fd(), w.as_fd(), a.as_fd()].repeat(6);
        let n = send(a.as_fd(), b"x", &many).expect("send");
        assert_eq!(n, 1);
        // Room for one descriptor (a few, with rustix's padding): the kernel truncates the
        // control data (MSG_CTRUNC).
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut buf = [0u8; 16];
        let err = receive_with(b.as_fd(), &mut buf, &mut space).expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // With room, the same exchange is whole.
        send(a.as_fd(), b"y", &many).expect("send");
        let (n, fds) = receive(b.as_fd(), &mut buf).expect("receive");
        assert_eq!((n, fds.len()), (1, many.len()));
    }

    #[test]
    fn a_handshake_ends_with_begin_and_one_whole_message() {
        let hello = zbus::Message::method_call("/org/freedesktop/DBus", "Hello")
            .destination("org.freedesktop.DBus")
            .build(&())
            .expect("message");
        let mut buf = b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n".to_vec();
        assert!(!ends_handshake(&buf), "no message yet");
        buf.extend_from_slice(hello.data());
        assert_eq!(message_len(hello.data()), Some(hello.data().len()));
        assert!(ends_handshake(&buf));
        buf.push(0);
        assert!(
            !ends_handshake(&buf),
            "a trailing byte is not one whole message"
        );
        assert!(!ends_handshake(hello.data()), "no BEGIN");
    }

    /// `data` (a little-endian message) with a header field of code 10 added after its own.
    fn with_unknown_field(data: &[u8]) -> Vec<u8> {
        let fixed: [u8; 16] = data[..16].try_into().expect("16 bytes");
        let (header, _) = frame::lengths(&fixed).expect("lengths");
        let mut out = data[..header].to_vec();
        out.extend([10, 1, b'u', 0, 7, 0, 0, 0]);
        out.extend_from_slice(&data[header..]);
        let fields = u32::try_from(header - 16 + 8).expect("small");
        out[12..16].copy_from_slice(&fields.to_le_bytes());
        out
    }

    /// A fake bus sends, in one write with three descriptors: its handshake lines, a peer's
    /// signal with an unknown field and two descriptors, its own signal with an unknown field,
    /// and a plain signal with one descriptor. zbus gets the bus's signal (stripped), then the
    /// plain one with exactly its descriptor, and the peer's descriptors are closed.
    #[test]
    fn a_peer_s_unreadable_message_is_dropped_with_its_descriptors() {
        use futures_util::StreamExt;
        use std::io::{Read, Write};
        let (client, mut server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (mut peer_r, peer_w) = std::io::pipe().expect("pipe");
        let (_plain_r, plain_w) = std::io::pipe().expect("pipe");
        let signal = |member: &str, sender: &str, fds: &[BorrowedFd<'_>]| {
            let fds: Vec<zbus::Fd<'_>> = fds.iter().map(|fd| zbus::Fd::from(*fd)).collect();
            zbus::Message::signal("/x", "org.example.I", member)
                .sender(sender)
                .build(&(fds,))
                .expect("message")
        };
        let peer = with_unknown_field(
            signal("FromPeer", ":1.9", &[peer_w.as_fd(), peer_w.as_fd()]).data(),
        );
        let bus = with_unknown_field(signal("FromBus", "org.freedesktop.DBus", &[]).data());
        let plain = signal("Plain", ":1.9", &[plain_w.as_fd()]);
        let mut all = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n".to_vec();
        all.extend(&peer);
        all.extend(&bus);
        all.extend(plain.data().iter());
        let fake_bus = std::thread::spawn(move || {
            read_until_begin(&mut server);
            let fds = [peer_w.as_fd(), peer_w.as_fd(), plain_w.as_fd()];
            let mut sent = send(server.as_fd(), &all, &fds).expect("send");
            while sent < all.len() {
                sent += server.write(&all[sent..]).expect("write");
            }
            server
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            client.set_nonblocking(true).expect("nonblocking");
            let client = UnixStream::from_std(client).expect("tokio");
            let halves = halves(client, None, Arc::new(AtomicBool::new(false)));
            let stream = zbus::connection::Builder::socket(halves)
                .p2p()
                .build_message_stream()
                .await
                .expect("connection");
            let mut stream = stream;
            let first = stream.next().await.expect("a message").expect("readable");
            assert_eq!(first.header().member().map(|m| m.as_str()), Some("FromBus"));
            assert_eq!(first.data().fds().len(), 0);
            let second = stream.next().await.expect("a message").expect("readable");
            assert_eq!(second.header().member().map(|m| m.as_str()), Some("Plain"));
            assert_eq!(second.data().fds().len(), 1);
        });
        let server = fake_bus.join().expect("fake bus");
        // The peer's two descriptors were closed with its message: with the fake bus's copy
        // gone too, the pipe has no writer left.
        drop(server);
        let mut rest = Vec::new();
        assert_eq!(peer_r.read_to_end(&mut rest).expect("read"), 0);
    }

    /// Large bodies and a trickle: lines and headers come a few bytes at a time, bodies in
    /// pieces. A peer's unreadable message with a large body is skipped whole, a plain one's body
    /// reaches zbus whole, and the bus's own stripped message after them still reads.
    #[test]
    fn messages_that_come_in_pieces_are_framed_alike() {
        use futures_util::StreamExt;
        use std::io::Write;
        let (client, mut server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let signal = |member: &str, sender: &str, len: usize| {
            zbus::Message::signal("/x", "org.example.I", member)
                .sender(sender)
                .build(&(vec![7u8; len],))
                .expect("message")
        };
        let peer = with_unknown_field(signal("FromPeer", ":1.9", 200_000).data());
        let plain = signal("Plain", ":1.9", 300_000).data().to_vec();
        let bus = with_unknown_field(signal("FromBus", "org.freedesktop.DBus", 3).data());
        let fake_bus = std::thread::spawn(move || {
            read_until_begin(&mut server);
            let trickle = |server: &mut std::os::unix::net::UnixStream, bytes: &[u8]| {
                for piece in bytes.chunks(5) {
                    server.write_all(piece).expect("write");
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            };
            trickle(
                &mut server,
                b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n",
            );
            for message in [&peer, &plain, &bus] {
                trickle(&mut server, &message[..64]);
                for piece in message[64..].chunks(40_000) {
                    server.write_all(piece).expect("write");
                }
            }
            server
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            client.set_nonblocking(true).expect("nonblocking");
            let client = UnixStream::from_std(client).expect("tokio");
            let halves = halves(client, None, Arc::new(AtomicBool::new(false)));
            let mut stream = zbus::connection::Builder::socket(halves)
                .p2p()
                .build_message_stream()
                .await
                .expect("connection");
            let first = stream.next().await.expect("a message").expect("readable");
            assert_eq!(first.header().member().map(|m| m.as_str()), Some("Plain"));
            let body: Vec<u8> = first.body().deserialize().expect("body");
            assert_eq!(body, vec![7u8; 300_000]);
            let second = stream.next().await.expect("a message").expect("readable");
            assert_eq!(
                second.header().member().map(|m| m.as_str()),
                Some("FromBus")
            );
            let body: Vec<u8> = second.body().deserialize().expect("body");
            assert_eq!(body, vec![7u8; 3]);
        });
        drop(fake_bus.join().expect("fake bus"));
    }

    #[test]
    fn handshake_lines_end_where_a_message_starts_at_a_line_s_start() {
        assert_eq!(
            handshake_lines(b"OK 12ab\r\nAGREE_UNIX_FD\r\nl\x02", false),
            24
        );
        assert_eq!(handshake_lines(b"l\x02\x01\x01", false), 0);
        assert_eq!(handshake_lines(b"B\x02\x01\x01", false), 0);
        // A line that came in pieces: its rest is a line's, whatever its first byte.
        assert_eq!(handshake_lines(b"ERROR \"bad\"\r\n", false), 13);
        assert_eq!(handshake_lines(b"line\"\r\nl", true), 7);
        assert_eq!(handshake_lines(b"OK 12", false), 5);
        assert_eq!(handshake_lines(b"", false), 0);
    }
}
