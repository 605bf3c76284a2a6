//! What the wrapper sends its keeper (see the protocol in `mod.rs`): the first order, `go`, with
//! the descriptors of what holds the instance, each checked to be the one announced; and the
//! orders after it (`kill`, `lock`, `delivered`), parsed into [`Order`]s.
//! Must not: act on an order; that is the keeper's (`process.rs`).
//!
//! Over 400 lines: half of it is the unit tests, which send each order with the descriptors it
//! may come with, and garbage.

use std::io::{self};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::process::{Pid, Signal};

use crate::run::FORWARDED;

/// What the wrapper said first.
pub(super) enum Go {
    /// Start COMMAND, holding these (none: `--backend dbus` on a bus we could not hand over).
    Start(Held),
    /// End of file: the wrapper gave up (or died) before it held the instance.
    Abandoned,
}

/// What the keeper holds, and keeps until COMMAND's last descendant is gone: each keeps other
/// copies out while it is open.
#[derive(Default)]
pub(super) struct Held {
    /// A duplicate of the lock file's descriptor (the open file description holds the lock).
    pub(super) lock: Option<OwnedFd>,
    /// A duplicate of the socket of the bus connection that owns the name: the bus keeps the
    /// name owned until the socket's last descriptor is closed. Never read nor written (see the
    /// module's documentation).
    pub(super) bus: Option<OwnedFd>,
    /// A duplicate of the wrapper's inotify instance that watches the lock file's path: never
    /// read while the wrapper lives; once it is gone, its queue tells what the wrapper never
    /// read (see [`Keeper::keep_lock_file`]).
    pub(super) watch: Option<OwnedFd>,
}

/// The longest first line the wrapper sends (`go lock DEV INO watch DEV INO bus DEV INO`, 145
/// bytes at most).
const GO_MAX: usize = 192;

/// Waits (blocking: the keeper has nothing else to do yet) for the wrapper's `go`, and takes the
/// descriptors that come with it, after checking each is the one announced. Received
/// close-on-exec, so that COMMAND inherits only the one duplicate of the lock `spawn_guarded`
/// makes for it, and never the bus socket.
pub(super) fn await_go(control: &UnixStream) -> Result<Go, String> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut line = Vec::new();
    let mut received: Vec<OwnedFd> = Vec::new();
    loop {
        let mut buf = [0u8; GO_MAX];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let message = match rustix::net::recvmsg(
            control,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(message) => message,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("cannot read its control socket: {e}")),
        };
        for part in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = part {
                received.extend(fds);
            }
        }
        // The kernel closed what did not fit: more than the three descriptors the wrapper sends.
        if message.flags.contains(ReturnFlags::CTRUNC) {
            return Err(
                "more descriptors than the lock's, its watch's and the bus's came with its order"
                    .into(),
            );
        }
        if message.bytes == 0 {
            if line.is_empty() && received.is_empty() {
                return Ok(Go::Abandoned);
            }
            return Err("its control socket closed in the middle of an order".into());
        }
        line.extend_from_slice(&buf[..message.bytes]);
        match line.iter().position(|&b| b == b'\n') {
            // The wrapper sends nothing more before the keeper has answered.
            Some(end) if end + 1 == line.len() => break,
            Some(_) => return Err("more than one order before COMMAND started".into()),
            None if line.len() > GO_MAX => return Err("an order too long".into()),
            None => {}
        }
    }
    parse_go(&line, received).map(Go::Start)
}

/// Parses the wrapper's first line, `go`, then `lock DEV INO`, `watch DEV INO` (only after
/// `lock`) and `bus DEV INO`, each at most once and in that order, with its newline: each
/// announces a descriptor that came with the line (`received`, in the order sent), and must name
/// it by device and inode. The lock's must be a regular file, the watch's an inotify instance,
/// the bus's a connected Unix stream socket (the only transport whose socket the library hands
/// out). Anything else, or a descriptor too many or too few, is refused.
fn parse_go(line: &[u8], received: Vec<OwnedFd>) -> Result<Held, String> {
    let shown = String::from_utf8_lossy(line);
    let shown = shown.trim_end();
    let count = received.len();
    let refuse = |why: &str| {
        format!(
            "an order it does not know before COMMAND started ({why}): {shown:?} with {count} \
             descriptor(s)"
        )
    };
    let text = line
        .strip_suffix(b"\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or_else(|| refuse("not one line of text"))?;
    let mut words = text.split(' ');
    if words.next() != Some("go") {
        return Err(refuse("not `go`"));
    }
    let words: Vec<&str> = words.collect();
    let parts = words.chunks_exact(3);
    if !parts.remainder().is_empty() {
        return Err(refuse("not `KIND DEV INO` after `go`"));
    }
    if parts.len() != count {
        return Err(refuse("not as many descriptors as announced"));
    }
    let mut held = Held::default();
    for (part, fd) in parts.zip(received) {
        let [kind, dev, ino] = part else {
            return Err(refuse("not `KIND DEV INO` after `go`"));
        };
        let (dev, ino) = lock_id(dev, ino).ok_or_else(|| refuse("not a device and inode"))?;
        match *kind {
            "lock" if held.lock.is_none() && held.bus.is_none() => {
                held.lock = Some(check_lock(fd, dev, ino)?);
            }
            "watch" if held.lock.is_some() && held.watch.is_none() && held.bus.is_none() => {
                held.watch = Some(check_watch(fd, dev, ino)?);
            }
            "bus" if held.bus.is_none() => held.bus = Some(check_bus(fd, dev, ino)?),
            _ => return Err(refuse("`lock`, `watch` after it, then `bus`, each once")),
        }
    }
    Ok(held)
}

/// The device and inode numbers of `go lock DEV INO` and `lock DEV INO`: decimal digits only.
fn lock_id(dev: &str, ino: &str) -> Option<(u64, u64)> {
    let number = |word: &str| {
        (!word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()))
            .then(|| word.parse().ok())
            .flatten()
    };
    Some((number(dev)?, number(ino)?))
}

/// `lock`, a descriptor received with `go lock DEV INO` or `lock DEV INO`, if it is of a regular
/// file with that device and inode.
pub(super) fn check_lock(lock: OwnedFd, dev: u64, ino: u64) -> Result<OwnedFd, String> {
    let stat = rustix::fs::fstat(&lock).map_err(|e| format!("the lock's descriptor: {e}"))?;
    let is_file =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile;
    if !is_file || (stat.st_dev, stat.st_ino) != (dev, ino) {
        return Err(format!(
            "the descriptor that came with the lock file {dev} {ino} is not that file"
        ));
    }
    Ok(lock)
}

/// `watch`, a descriptor received with `go lock DEV INO watch DEV INO`, if it is an inotify
/// instance (`/proc/self/fd` names one `anon_inode:inotify`; every anonymous inode shares one
/// device and inode, which it must have all the same).
fn check_watch(watch: OwnedFd, dev: u64, ino: u64) -> Result<OwnedFd, String> {
    let stat = rustix::fs::fstat(&watch).map_err(|e| format!("the watch's descriptor: {e}"))?;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", watch.as_raw_fd()))
        .map_err(|e| format!("the watch's descriptor: {e}"))?;
    if target.as_os_str() != "anon_inode:inotify" || (stat.st_dev, stat.st_ino) != (dev, ino) {
        return Err(format!(
            "the descriptor that came with the watch {dev} {ino} is not an inotify instance"
        ));
    }
    Ok(watch)
}

/// `bus`, a descriptor received with `go ... bus DEV INO`, if it is a connected Unix stream
/// socket (as the library's bus sockets are) with that device and inode.
fn check_bus(bus: OwnedFd, dev: u64, ino: u64) -> Result<OwnedFd, String> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let stat = rustix::fs::fstat(&bus).map_err(|e| format!("the bus socket's descriptor: {e}"))?;
    let is_socket =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Socket;
    if !is_socket || (stat.st_dev, stat.st_ino) != (dev, ino) {
        return Err(format!(
            "the descriptor that came with the bus socket {dev} {ino} is not that socket"
        ));
    }
    if sockopt::socket_domain(&bus).ok() != Some(AddressFamily::UNIX)
        || sockopt::socket_type(&bus).ok() != Some(SocketType::STREAM)
    {
        return Err("the bus socket is not a Unix stream socket".into());
    }
    rustix::net::getpeername(&bus).map_err(|e| format!("the bus socket is not connected: {e}"))?;
    Ok(bus)
}

/// Takes ownership of the inherited descriptor `fd`, if it is open and of type `kind`.
#[allow(unsafe_code)]
pub(super) fn adopt(fd: i32, kind: rustix::fs::FileType) -> Result<OwnedFd, String> {
    if fd < 3 {
        return Err(format!("descriptor {fd} is not one `run` hands down"));
    }
    // SAFETY: at this point nothing in this process has opened a descriptor of its own (no
    // runtime, no file, no socket yet), so an open `fd` above stdio is one we inherited and nobody
    // else here owns; `fcntl_getfd` on the borrowed number only asks whether it is open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if rustix::io::fcntl_getfd(borrowed).is_err() {
        return Err(format!("descriptor {fd} is not open"));
    }
    let is_kind = rustix::fs::fstat(borrowed)
        .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode) == kind);
    if !is_kind {
        return Err(format!("descriptor {fd} is not a {kind:?}"));
    }
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("descriptor {fd}: {e}"))?;
    // SAFETY: as above: it is open, inherited, and from here on owned by this value alone.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The longest line the wrapper sends (`kill PID SIGNAL`, `lock DEV INO`, `delivered
/// SIGNAL`, `tree SIGNAL`), with room.
pub(super) const MAX_ORDER: usize = 64;

/// An order of the wrapper.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// Send `signal` to `pid`, if it is still our child.
    Kill { pid: Pid, signal: Signal },
    /// Hold the lock file (`dev`, `ino`) whose descriptor came with the line.
    Lock { dev: u64, ino: u64 },
    /// The service manager sent `signal` to every process of the unit.
    Delivered { signal: Signal },
    /// Send `signal` (SIGTERM or SIGKILL) to every descendant: the instance was lost.
    Tree { signal: Signal },
}

/// Parses one line of the wrapper (without its newline); the error says what is wrong with it.
pub(super) fn parse_order(line: &str) -> Result<Order, String> {
    if let Some(signal) = line.strip_prefix("delivered ") {
        return Ok(Order::Delivered {
            signal: forwarded_signal(signal)?,
        });
    }
    if let Some(signal) = line.strip_prefix("tree ") {
        let signal = [Signal::TERM, Signal::KILL]
            .into_iter()
            .find(|s| signal == s.as_raw().to_string())
            .ok_or_else(|| format!("not SIGTERM or SIGKILL: {signal:?}"))?;
        return Ok(Order::Tree { signal });
    }
    let mut words = line.split(' ');
    let (Some(word @ ("kill" | "lock")), Some(pid), Some(signal), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(
            "not an order of the form `kill PID SIGNAL`, `lock DEV INO`, `delivered SIGNAL` or \
             `tree SIGNAL`"
                .into(),
        );
    };
    if word == "lock" {
        let (dev, ino) =
            lock_id(pid, signal).ok_or_else(|| format!("not a device and inode: {line:?}"))?;
        return Ok(Order::Lock { dev, ino });
    }
    // Checked before `Pid::from_raw`, which takes no negative number; written as the wrapper
    // writes it (no sign, no leading zero).
    let pid = pid
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0 && pid == p.to_string())
        .and_then(Pid::from_raw)
        .ok_or_else(|| format!("not a process id: {pid:?}"))?;
    // Only the signals the wrapper sends: those it passes on, SIGKILL after the grace, and
    // SIGCONT after a SIGTERM of its own (so that a stopped process acts on it).
    let signal = match signal.parse::<i32>() {
        Ok(kill) if kill == Signal::KILL.as_raw() && signal == kill.to_string() => Signal::KILL,
        Ok(cont) if cont == Signal::CONT.as_raw() && signal == cont.to_string() => Signal::CONT,
        _ => forwarded_signal(signal)?,
    };
    Ok(Order::Kill { pid, signal })
}

/// One of the signals the wrapper passes on, written as the wrapper writes it (a plain decimal
/// number: no sign, no leading zero).
fn forwarded_signal(word: &str) -> Result<Signal, String> {
    word.parse::<i32>()
        .ok()
        .filter(|s| FORWARDED.contains(s) && word == s.to_string())
        .and_then(Signal::from_named_raw)
        .ok_or_else(|| format!("not a signal the wrapper sends: {word:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::testing::send;
    use std::os::fd::AsFd;

    /// ` KIND DEV INO` for `fd`, as the wrapper announces it.
    fn announce(kind: &str, fd: BorrowedFd<'_>) -> String {
        let stat = rustix::fs::fstat(fd).expect("fstat");
        format!(" {kind} {} {}", stat.st_dev, stat.st_ino)
    }

    fn same(a: &OwnedFd, b: BorrowedFd<'_>) -> bool {
        let a = rustix::fs::fstat(a).expect("fstat");
        let b = rustix::fs::fstat(b).expect("fstat");
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    /// A test case of `go`: its name, the line, the descriptors sent with it, and what the
    /// keeper must then hold (lock, bus), or `None` when it must refuse.
    type GoCase<'a> = (&'a str, String, Vec<BorrowedFd<'a>>, Option<(bool, bool)>);

    #[test]
    fn what_comes_with_go_is_checked() {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = std::fs::File::create(dir.path().join("a.lock")).expect("lock file");
        let other = std::fs::File::create(dir.path().join("b.lock")).expect("another file");
        let (pipe, _writer) = std::io::pipe().expect("pipe");
        // The bus connection's socket: a connected Unix stream socket.
        let (bus, _bus_peer) = UnixStream::pair().expect("socketpair");
        let unconnected = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        let (datagram, _datagram_peer) =
            std::os::unix::net::UnixDatagram::pair().expect("datagram pair");
        let inotify =
            rustix::fs::inotify::init(rustix::fs::inotify::CreateFlags::CLOEXEC).expect("inotify");
        let (l, b, w) = (lock.as_fd(), bus.as_fd(), inotify.as_fd());
        let lock_ann = announce("lock", l);
        let bus_ann = announce("bus", b);
        let watch_ann = announce("watch", w);
        let both = format!("go{lock_ann}{bus_ann}\n");
        let lock_only = format!("go{lock_ann}\n");
        let bus_only = format!("go{bus_ann}\n");
        let plus = lock_ann.replace("lock ", "lock +");
        // Each case: what is sent, and what the keeper must hold then (`None`: refused).
        let cases: Vec<GoCase<'_>> = vec![
            (
                "both, and sent",
                both.clone(),
                vec![l, b],
                Some((true, true)),
            ),
            ("nothing", "go\n".into(), vec![], Some((false, false))),
            (
                "all three",
                format!("go{lock_ann}{watch_ann}{bus_ann}\n"),
                vec![l, w, b],
                Some((true, true)),
            ),
            (
                "the lock and its watch",
                format!("go{lock_ann}{watch_ann}\n"),
                vec![l, w],
                Some((true, false)),
            ),
            (
                "a watch with no lock",
                format!("go{watch_ann}{bus_ann}\n"),
                vec![w, b],
                None,
            ),
            (
                "the watch after the bus",
                format!("go{lock_ann}{bus_ann}{watch_ann}\n"),
                vec![l, b, w],
                None,
            ),
            (
                "the watch before the lock",
                format!("go{watch_ann}{lock_ann}\n"),
                vec![w, l],
                None,
            ),
            (
                "the watch twice",
                format!("go{lock_ann}{watch_ann}{watch_ann}\n"),
                vec![l, w, w],
                None,
            ),
            (
                "a file as the watch",
                format!("go{lock_ann}{}\n", announce("watch", other.as_fd())),
                vec![l, other.as_fd()],
                None,
            ),
            (
                "a socket as the watch",
                format!("go{lock_ann}{}\n", announce("watch", b)),
                vec![l, b],
                None,
            ),
            (
                "four descriptors",
                format!("go{lock_ann}{watch_ann}{bus_ann}\n"),
                vec![l, w, b, other.as_fd()],
                None,
            ),
            (
                "the lock alone",
                lock_only.clone(),
                vec![l],
                Some((true, false)),
            ),
            (
                "the bus alone",
                bus_only.clone(),
                vec![b],
                Some((false, true)),
            ),
            ("announced, none sent", both.clone(), vec![], None),
            ("one of two sent", both.clone(), vec![l], None),
            ("sent in the other order", both.clone(), vec![b, l], None),
            (
                "another file than announced",
                lock_only.clone(),
                vec![other.as_fd()],
                None,
            ),
            ("not a file", lock_only.clone(), vec![pipe.as_fd()], None),
            (
                "one more than announced",
                lock_only.clone(),
                vec![l, other.as_fd()],
                None,
            ),
            ("none announced, one sent", "go\n".into(), vec![l], None),
            (
                "the lock as the bus",
                format!("go{}\n", announce("bus", l)),
                vec![l],
                None,
            ),
            (
                "an unconnected socket",
                format!("go{}\n", announce("bus", unconnected.as_fd())),
                vec![unconnected.as_fd()],
                None,
            ),
            (
                "a datagram socket",
                format!("go{}\n", announce("bus", datagram.as_fd())),
                vec![datagram.as_fd()],
                None,
            ),
            (
                "bus before lock",
                format!("go{bus_ann}{lock_ann}\n"),
                vec![b, l],
                None,
            ),
            (
                "the lock twice",
                format!("go{lock_ann}{lock_ann}\n"),
                vec![l, l],
                None,
            ),
            ("a sign", format!("go{plus}\n"), vec![l], None),
            (
                "a trailing space",
                format!("go{lock_ann} \n"),
                vec![l],
                None,
            ),
            (
                "an unknown kind",
                format!("go{}\n", announce("pipe", l)),
                vec![l],
                None,
            ),
        ];
        for (case, text, fds, want) in cases {
            let (wrapper, keeper) = UnixStream::pair().expect("socketpair");
            send(&wrapper, &text, &fds);
            match (await_go(&keeper), want) {
                (Ok(Go::Start(held)), Some((has_lock, has_bus))) => {
                    assert_eq!(held.lock.is_some(), has_lock, "{case}");
                    assert_eq!(held.bus.is_some(), has_bus, "{case}");
                    assert_eq!(held.watch.is_some(), text.contains(" watch "), "{case}");
                    for (fd, want) in [(&held.lock, l), (&held.bus, b), (&held.watch, w)] {
                        let Some(fd) = fd else { continue };
                        assert!(same(fd, want), "{case}: not the one sent");
                        // COMMAND must not inherit the keeper's own copies.
                        let flags = rustix::io::fcntl_getfd(fd).expect("getfd");
                        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "{case}");
                    }
                }
                (Err(message), None) => assert!(!message.is_empty(), "{case}"),
                (Ok(_), _) => panic!("{case}: accepted"),
                (Err(message), Some(_)) => panic!("{case}: refused: {message}"),
            }
        }
    }

    #[test]
    fn end_of_file_before_go_is_an_abandoned_keeper_and_anything_else_an_error() {
        let (wrapper, keeper) = UnixStream::pair().expect("socketpair");
        drop(wrapper);
        assert!(matches!(await_go(&keeper), Ok(Go::Abandoned)));

        let (wrapper, keeper) = UnixStream::pair().expect("socketpair");
        send(&wrapper, "go", &[]);
        drop(wrapper);
        assert!(await_go(&keeper).is_err(), "half an order");

        for text in [
            "kill 1 9\n",
            "go\nkill 1 9\n",
            "go lock x y\n",
            &"g".repeat(GO_MAX + 1),
        ] {
            let (wrapper, keeper) = UnixStream::pair().expect("socketpair");
            send(&wrapper, text, &[]);
            drop(wrapper);
            assert!(await_go(&keeper).is_err(), "{text:?}");
        }
    }

    #[test]
    fn orders_are_parsed() {
        assert_eq!(
            parse_order("kill 42 15"),
            Ok(Order::Kill {
                pid: Pid::from_raw(42).expect("pid"),
                signal: Signal::TERM
            })
        );
        assert_eq!(
            parse_order("kill 7 9"),
            Ok(Order::Kill {
                pid: Pid::from_raw(7).expect("pid"),
                signal: Signal::KILL
            })
        );
        assert_eq!(
            parse_order("kill 7 18"),
            Ok(Order::Kill {
                pid: Pid::from_raw(7).expect("pid"),
                signal: Signal::CONT
            })
        );
        assert_eq!(
            parse_order("tree 15"),
            Ok(Order::Tree {
                signal: Signal::TERM
            })
        );
        assert_eq!(
            parse_order("tree 9"),
            Ok(Order::Tree {
                signal: Signal::KILL
            })
        );
        for bad in ["tree 2", "tree 09", "tree ", "tree 15 15"] {
            assert!(parse_order(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_order("lock 2049 18446744073709551615"),
            Ok(Order::Lock {
                dev: 2049,
                ino: u64::MAX
            })
        );
        assert_eq!(
            parse_order("delivered 15"),
            Ok(Order::Delivered {
                signal: Signal::TERM
            })
        );
    }

    #[test]
    fn garbage_is_a_protocol_error_not_a_panic() {
        for line in [
            // Once a debug assertion in `Pid::from_raw`: a negative PID (and -1 is "every
            // process we may signal").
            "kill -1 9",
            "kill -42 15",
            "kill 0 15",
            "kill 2147483648 15",
            "kill 42 0",
            "kill 42 -9",
            // A real signal, but not one the wrapper sends.
            "kill 42 11",
            "kill 42 64",
            "kill 42",
            "kill 42 15 extra",
            "kill  42 15",
            "kill 42 15 ",
            "kill x 15",
            "kill 42 TERM",
            "kill +42 15",
            "kill 042 15",
            "kill 42 +15",
            "kill 42 09",
            "kill 42 018",
            "kill 42 +18",
            "KILL 42 15",
            "delivered",
            "delivered ",
            "delivered 9",
            "delivered 18",
            "delivered 11",
            "delivered +15",
            "delivered 15 15",
            "delivered  15",
            "DELIVERED 15",
            "reaped 42",
            "lock",
            "lock 1",
            "lock 1 2 3",
            "lock +1 2",
            "lock 1 -2",
            "lock 1 x",
            "lock 1 0x2",
            "lock 1 18446744073709551616",
            "lock  1 2",
            "LOCK 1 2",
            "",
            "\u{fffd}",
        ] {
            let problem = parse_order(line).expect_err(line);
            assert!(!problem.is_empty(), "{line:?}");
        }
    }
}
