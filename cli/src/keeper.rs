//! The keeper: the process `run` puts between itself and COMMAND, so that nothing COMMAND
//! started outlives the instance, even when the wrapper is killed by SIGKILL.
//!
//! Over 400 lines: both ends of one protocol (the keeper, and the wrapper's handle on it, at the
//! bottom) and its unit tests are kept side by side, so that a line changed on one side is
//! changed on the other at once.
//!
//! The wrapper (`run`) re-executes its own binary (`/proc/self/exe internal-keeper ...`, an
//! entry point that no help, man page or completion shows) as the keeper, handing it one end of
//! a control socket, and over that socket, once the wrapper holds the instance, duplicates of
//! what holds it: the lock's open file description, and the socket of the bus connection that
//! owns the name. A copy that will wait (`--wait`) starts its keeper before waiting, so that the
//! keeper's start-up (an exec, the dynamic loader, parsing) overlaps the wait instead of
//! following the take-over, and one that found the lock file free when it looked (it will most
//! likely win) starts it once it has taken the lock file and sent the bus its request, so that
//! the start-up overlaps the bus's answer; any other copy starts it once it holds the instance,
//! so that a copy refused by that look never pays for one.
//! Either way the keeper starts nothing before the wrapper's `go`: COMMAND starts only once the
//! instance is held. The keeper is a child subreaper and starts COMMAND
//! ([`crate::run::spawn_guarded`]): every process COMMAND starts and leaves orphaned is
//! re-parented to the keeper, so the keeper has a child until the whole tree is gone, and it
//! holds the lock and the bus connection until then — whatever the processes did to their
//! descriptors, credentials, process group or session.
//!
//! The keeper has a process group of its own (in the wrapper's session), and COMMAND joins the
//! wrapper's: a kill of the wrapper's whole group (`kill -9 -PGID`, a supervisor's group kill)
//! kills the wrapper and COMMAND but leaves the keeper to stop the rest, while a terminal's
//! Ctrl-C, Ctrl-Z and hang-up reach COMMAND as they reach the wrapper (a process may join a
//! group of its own session; the keeper's group is never the terminal's foreground group). Out
//! of the foreground group, the keeper ignores SIGTTOU and SIGTTIN, so that a message it writes
//! to a terminal set to `tostop` does not stop it; COMMAND gets their default action back.
//!
//! The bus socket is only held, never read nor written: the byte stream is the wrapper's
//! connection. Once the wrapper is gone nobody reads what the bus sends to it; the bus queues
//! that up to its limit for one connection. The connection subscribes to no signal, so that is
//! only what is addressed to it: `NameLost`/`NameAcquired` if the name changes hands, and calls
//! other programs make to the name, which get no answer (dbus-daemon refuses messages to a full
//! queue, `LimitsExceeded`; dbus-broker refuses calls, and drops the connection when one of its
//! own messages does not fit). The bus keeps the name owned while the socket is open: until the
//! keeper exits, after the last descendant.
//!
//! While the wrapper lives it decides everything (which signals COMMAND gets, the loss of the
//! instance, `--kill-after`, the exit status) and the keeper carries it out. The protocol, one
//! text line per message on the socket:
//! - wrapper to keeper, first and once: `go`, then `lock DEV INO` (the lock file), `watch DEV
//!   INO` (the inotify instance of the lock file's watch, only with `lock`) and `bus DEV INO`
//!   (the bus connection's socket), each when the wrapper holds it, in that order, sent with
//!   those descriptors attached in the same order (`SCM_RIGHTS`): start COMMAND. The keeper
//!   checks that it got exactly the descriptors announced, each with that device and inode, the
//!   lock's a regular file, the watch's an inotify instance (`anon_inode:inotify`), the bus's a
//!   connected Unix stream socket (the only transport whose socket the library hands out; on
//!   another, `run` hands none). The watch is never read while the wrapper lives (see below).
//!   End of file before `go` (the
//!   wait ended without the instance, or the wrapper died): the keeper exits at once, having
//!   started nothing and said nothing (the wrapper also kills it and reaps it, so that nothing
//!   of it is left);
//! - wrapper to keeper, after a `go` with `lock`, each time the wrapper's lock file was removed
//!   and re-created (the library's `lock_file_recreations`): `lock DEV INO`, sent with the new
//!   file's descriptor attached, and checked as `go`'s is. From then on the keeper holds the
//!   new file (and closes the removed one, which keeps no copy out any more): without it, a
//!   wrapper killed after a re-creation would leave the new file unlocked while the keeper still
//!   stops COMMAND's tree. One killed while it sends this line leaves the keeper the descriptor
//!   without its whole line: taken then, if it is the lock file at the path (see below). One
//!   killed between the re-creation and this line leaves the new file unlocked at the path: the
//!   keeper finds another file there, cannot re-create its own, and holds nothing verifiable
//!   (SIGKILL at once, below). A descriptor with no `lock` line, more than one with it, or a
//!   `lock` line with none (or after a `go` with no lock), is a protocol error;
//! - wrapper to keeper: `kill PID SIGNAL` — sent only while PID is the keeper's own child, not
//!   yet reaped (so never to a reused PID); the keeper checks that it is, and that PID and
//!   SIGNAL are numbers it could mean (SIGNAL: one the wrapper passes on, SIGKILL, or SIGCONT,
//!   which follows each SIGTERM the wrapper sends of its own accord);
//! - wrapper to keeper: `delivered SIGNAL` — the service manager sent SIGNAL to every process of
//!   the unit, COMMAND's tree included, so the wrapper did not pass it on (see below). Any other
//!   line is a protocol error: the keeper drops the socket and acts as when the wrapper is gone
//!   (fail closed);
//! - keeper to wrapper: `started PID` (COMMAND runs), `failed ERRNO MESSAGE` (COMMAND could not
//!   be started), `error MESSAGE` (the keeper cannot do its job), `exited STATUS` (COMMAND's raw
//!   wait status), `reaped` (one or more other children of the keeper ended since the last
//!   `reaped`: the wrapper looks again at who is left), `gone` (no child is left; the keeper
//!   exits).
//!
//! Neither side ever blocks on a write while it does not read: with thousands of processes
//! left behind, the wrapper's `kill` orders and the keeper's notices fill both directions of
//! the socket, and two writers waiting for each other would hold the instance for good. Each
//! side queues what it sends and writes it when the socket has room, in the same wait that
//! reads. The keeper's queue stays small: `reaped` notices are merged into one.
//!
//! When the wrapper dies (end of file on the socket) the keeper names itself in the lock file's
//! record, so that refused copies name it, the live holder, not the dead wrapper ("holder
//! unknown", after the grace a record gets), and stops the tree itself: SIGTERM (and SIGCONT) to
//! every descendant, SIGKILL after `--kill-after`, and exits once none is left; the lock and the
//! name are held until then. Meanwhile it keeps the lock file as the wrapper did
//! ([`unique_instance::HandedLockFile`], planned from the instance arguments the wrapper passes
//! on its command line, and checked to be the file it holds): the directory is watched with
//! the wrapper's own inotify instance (`go ... watch`; in the same `poll`), whose queue still
//! holds what the wrapper's watch never read — the wrapper was stopped while its file was moved
//! away, another copy came and went, and the file was moved back: a loss, which a new instance
//! made only now would never show (see [`unique_instance::HandedLockFile::with_watch`], and its
//! caveats: what the wrapper read but had not acted on when it died is not there any more; its
//! own re-creation not read yet counts as another's file). A lock file seen only removed is
//! re-created, locked and
//! recorded in the keeper's name by the library's own re-creation, with its checks and its rate
//! limit. Without that, a file removed then (an administrator, a tmp cleaner) would leave the
//! keeper holding a file nobody can find, and a new copy would run beside the old tree, for up
//! to `--kill-after` or as long as a descendant it cannot signal lives. A lock file that is not
//! re-created (replaced, its directory gone, another copy made a file there, removed more than
//! 16 times within a second, or found removed without the removal having been seen: before the
//! watch was in place, or without inotify) excludes no copy any more: the keeper says so, and unless the
//! bus name still holds the instance it holds nothing verifiable, and kills the tree at once
//! (SIGKILL), as below. A process already sent SIGTERM gets no second one (many programs
//! take a second SIGTERM as "stop now, skip the clean-up"), only SIGCONT: COMMAND (or a child
//! of the keeper) once a `kill PID 15` reached it — the wrapper passed on a SIGTERM, or stopped
//! COMMAND after a loss — and every process after `delivered 15` (systemd stopping the unit
//! with `KillMode=control-group`). That is how `systemctl stop` ends when COMMAND outlasts
//! `TimeoutStopSec`: systemd SIGKILLs the unit's processes one by one, and a keeper that sees
//! the wrapper die first is still running for a moment. Holding neither (`--backend dbus` on a transport whose socket `run`
//! cannot hand over, or once the bus has closed the connection), nothing excludes a new copy:
//! SIGKILL at once. A descendant it cannot signal (another user's, when the keeper is not root)
//! is waited for: exclusion holds until it is gone. The keeper ignores the signals the wrapper
//! passes on (the wrapper starts it with them ignored, and COMMAND gets their defaults back):
//! systemd's SIGTERM to the whole cgroup reaches the keeper too, and the wrapper decides what
//! COMMAND gets.
//!
//! A wrapper whose process group's leader is outside its PID namespace (a command run in a
//! container entered with `nsenter`) cannot name its group (`getpgrp` says 0): the keeper then
//! stays in that group, and a kill of the whole group takes the keeper too, as below.
//!
//! Not covered: the keeper itself killed by SIGKILL — by its own PID or process group, by the
//! OOM killer choosing it (it is small and allocates little, so it is rarely chosen; a cgroup's
//! group OOM kill takes the whole tree with it), or by `kill -9 -1`. COMMAND then dies by
//! `PR_SET_PDEATHSIG` unless it changed its credentials; if the wrapper still lives it is a
//! child subreaper too and stops the rest itself; if not, what still holds the inherited lock
//! descriptor keeps the instance held, and a descendant that closed it runs on unguarded. And a
//! bus that exits frees the name whatever the keeper holds: only a lock file, if one is held,
//! still excludes then.
//!
//! Not covered either: a stopped job whose shell dies abruptly. COMMAND's parent is the keeper,
//! in another process group of the same session, so the wrapper's group (the job: the wrapper
//! and COMMAND) never becomes orphaned in the kernel's sense, and the kernel never sends it the
//! SIGHUP and SIGCONT it sends an orphaned group with a stopped member. Stopped (Ctrl-Z) and
//! then left by a shell or supervisor killed by SIGKILL, the wrapper and COMMAND stay stopped,
//! and the instance held, until something sends them SIGCONT or kills them (`kill -CONT -PGID`;
//! or SIGKILL to the wrapper, after which the keeper stops the tree). A shell that exits on its
//! own, or hangs up, signals its stopped jobs itself: not affected. The keeper does not do the
//! kernel's work here: it is told of no change of the wrapper's state or parent, and would have
//! to poll for it.
//!
//! The keeper is small and synchronous: one thread, no runtime, `poll` on the socket and on a
//! SIGCHLD pipe; it allocates nothing between fork and exec, and never panics.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use unique_instance::{HandedLockFile, HandedLockState};

use crate::cli::{InstanceArgs, KeeperArgs};
use crate::run::{FORWARDED, LOCK_FD_ENV, children_in, parent_in_stat, signal_bit};
use crate::{EXIT_INTERNAL, EXIT_USAGE, ExitCode, fail};

/// The first argument that makes the binary the keeper (see `main`).
pub(crate) const SUBCOMMAND: &str = "internal-keeper";

/// While the wrapper is gone and the tree is being stopped, how often the keeper looks again for
/// descendants: one re-parented to it when its own parent died is announced by no SIGCHLD.
const RESCAN: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// The keeper process

/// The keeper's entry point (`unique-instance internal-keeper ...`).
pub(crate) fn keeper(args: KeeperArgs) -> ExitCode {
    let control = match adopt(args.control_fd, rustix::fs::FileType::Socket) {
        Ok(fd) => UnixStream::from(fd),
        Err(message) => {
            return fail(
                EXIT_USAGE,
                format_args!(
                    "{SUBCOMMAND} is started by `unique-instance run` only, never by hand: \
                     {message}"
                ),
            );
        }
    };
    // 0: the wrapper's group has no number in our PID namespace, and we are in it still.
    if args.process_group < 0 {
        return fail(
            EXIT_USAGE,
            format_args!("{SUBCOMMAND}: not a process group: {}", args.process_group),
        );
    }
    let group = Pid::from_raw(args.process_group);
    let ignored = args
        .ignored_signals
        .iter()
        .filter(|&&signal| FORWARDED.contains(&signal))
        .fold(0, |all, &signal| all | signal_bit(signal));
    // Before anything is written to the terminal: see `ignore_tty_stops`.
    let tty_stops = ignore_tty_stops();
    let held = match await_go(&control) {
        Ok(Go::Start(held)) => held,
        // Nothing was started, and nobody is there to be told.
        Ok(Go::Abandoned) => return ExitCode::SUCCESS,
        Err(message) => {
            let _ = (&control).write_all(format!("error {message}\n").as_bytes());
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let mut keeper = match Keeper::new(control, args.kill_after) {
        Ok(keeper) => Keeper {
            options: Some(args.instance.options()),
            ..keeper
        },
        Err(e) => {
            return fail(
                EXIT_INTERNAL,
                format_args!("keeper: cannot watch its control socket: {e}"),
            );
        }
    };
    keeper.run(
        &args.command,
        held,
        crate::run::Placement {
            group,
            tty_stops,
            ignored,
        },
    )
}

/// The keeper is not in the terminal's foreground process group (it has a group of its own), so
/// the kernel would stop it (SIGTTOU) when it writes to a terminal set to `tostop`, and SIGTTIN
/// if it read one: it ignores both. Returns those it ignores now and did not when it started,
/// for COMMAND to get their default action back (one inherited ignored stays ignored).
#[allow(unsafe_code)]
fn ignore_tty_stops() -> [Option<i32>; 2] {
    use nix::sys::signal::{SigHandler, Signal as NixSignal, signal};
    [NixSignal::SIGTTOU, NixSignal::SIGTTIN].map(|tty_stop| {
        // SAFETY: SIG_IGN installs no handler, so no code of ours runs in a signal context.
        let before = unsafe { signal(tty_stop, SigHandler::SigIgn) };
        match before {
            Ok(SigHandler::SigIgn) => None,
            _ => Some(tty_stop as i32),
        }
    })
}

/// What the wrapper said first.
enum Go {
    /// Start COMMAND, holding these (none: `--backend dbus` on a bus we could not hand over).
    Start(Held),
    /// End of file: the wrapper gave up (or died) before it held the instance.
    Abandoned,
}

/// What the keeper holds, and keeps until COMMAND's last descendant is gone: each keeps other
/// copies out while it is open.
#[derive(Default)]
struct Held {
    /// A duplicate of the lock file's descriptor (the open file description holds the lock).
    lock: Option<OwnedFd>,
    /// A duplicate of the socket of the bus connection that owns the name: the bus keeps the
    /// name owned until the socket's last descriptor is closed. Never read nor written (see the
    /// module's documentation).
    bus: Option<OwnedFd>,
    /// A duplicate of the wrapper's inotify instance that watches the lock file's path: never
    /// read while the wrapper lives; once it is gone, its queue tells what the wrapper never
    /// read (see [`Keeper::keep_lock_file`]).
    watch: Option<OwnedFd>,
}

/// The longest first line the wrapper sends (`go lock DEV INO watch DEV INO bus DEV INO`, 145
/// bytes at most).
const GO_MAX: usize = 192;

/// Waits (blocking: the keeper has nothing else to do yet) for the wrapper's `go`, and takes the
/// descriptors that come with it, after checking each is the one announced. Received
/// close-on-exec, so that COMMAND inherits only the one duplicate of the lock `spawn_guarded`
/// makes for it, and never the bus socket.
fn await_go(control: &UnixStream) -> Result<Go, String> {
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
fn check_lock(lock: OwnedFd, dev: u64, ino: u64) -> Result<OwnedFd, String> {
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
fn adopt(fd: i32, kind: rustix::fs::FileType) -> Result<OwnedFd, String> {
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

struct Keeper {
    /// The control socket; `None` once the wrapper is gone.
    control: Option<UnixStream>,
    /// Bytes read from the wrapper that do not make a whole line yet.
    inbox: Vec<u8>,
    /// What is still to be sent to the wrapper: whole lines, a handful at most (see `tell`).
    outbox: Vec<u8>,
    /// A child other than COMMAND was reaped since the last `reaped` notice was queued.
    reaped_due: bool,
    /// Readable when a SIGCHLD came (signal-hook writes to the other end).
    sigchld: UnixStream,
    /// COMMAND, until it has been reaped.
    command: Option<Pid>,
    kill_after: Duration,
    /// The lock file held until the last descendant is gone: the one `go lock` gave, or the
    /// latest that `lock` gave since (see the protocol at the top). `None` with `--backend dbus`.
    lock: Option<OwnedFd>,
    /// Descriptors received from the wrapper and not yet claimed by their `lock` line.
    received: std::collections::VecDeque<OwnedFd>,
    /// The wrapper's end of the socket closed (or a write found it closed): it is gone, and
    /// the keeper alone holds the instance now.
    wrapper_left: bool,
    /// The socket of the bus connection that owns the name, held until the last descendant is
    /// gone and never read nor written (see the module's documentation); `None` once the bus
    /// closed the connection, or when `go` gave none.
    bus: Option<OwnedFd>,
    /// Our children (not reaped since) that a `kill PID 15` reached: not sent SIGTERM again.
    sent_term: std::collections::HashSet<Pid>,
    /// The instance's options as the wrapper was given them (its lock file's plan), for
    /// [`Keeper::keep_lock_file`]; `None` in unit tests.
    options: Option<unique_instance::InstanceOptions>,
    /// The wrapper's inotify instance that watches the lock file's path (`go ... watch`):
    /// never read while the wrapper lives; once it is gone, the lock file is kept with it (see
    /// [`Keeper::keep_lock_file`]).
    watch: Option<OwnedFd>,
    /// Once the wrapper is gone: the lock file, watched and re-created when removed, in place of
    /// `lock` (see [`Keeper::keep_lock_file`]).
    kept: Option<HandedLockFile>,
    /// The lock file once it could not be kept: it excludes no copy any more, but it is held
    /// until the keeper exits all the same.
    let_go: Option<HandedLockFile>,
    /// The lock file once the wrapper was gone, when it could not even be taken to be kept
    /// (moved away, its directory gone: see [`Keeper::keep_lock_file`]): held until the keeper
    /// exits, excluding no copy.
    unkept: Option<OwnedFd>,
    /// A pidfd of our parent when we started, the wrapper: readable once it has exited, which
    /// is also once we have a new parent (see [`Keeper::wrapper_exited`]). `None` where pidfds
    /// cannot be had.
    wrapper: Option<OwnedFd>,
    /// The service manager sent SIGTERM to the whole tree (`delivered 15`): nobody is sent it
    /// again.
    tree_got_term: bool,
}

impl Keeper {
    fn new(control: UnixStream, kill_after: Duration) -> io::Result<Self> {
        control.set_nonblocking(true)?;
        let (sigchld, wake) = UnixStream::pair()?;
        sigchld.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, wake)?;
        Ok(Keeper {
            control: Some(control),
            inbox: Vec::new(),
            outbox: Vec::new(),
            reaped_due: false,
            sigchld,
            command: None,
            kill_after,
            lock: None,
            received: std::collections::VecDeque::new(),
            wrapper_left: false,
            bus: None,
            sent_term: std::collections::HashSet::new(),
            tree_got_term: false,
            options: None,
            watch: None,
            kept: None,
            let_go: None,
            unkept: None,
            wrapper: rustix::process::getppid().and_then(|parent| {
                rustix::process::pidfd_open(parent, rustix::process::PidfdFlags::empty()).ok()
            }),
        })
    }

    fn run(
        &mut self,
        command: &[OsString],
        held: Held,
        placement: crate::run::Placement,
    ) -> ExitCode {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            // Without it, what COMMAND leaves would go to init, unguarded: fail closed.
            self.tell(&format!("error cannot become a child subreaper: {e}"));
            self.deliver();
            return ExitCode::from(EXIT_INTERNAL);
        }
        // The wrapper may have died since it started us: then COMMAND must not start at all.
        if self.wrapper_gone() {
            return ExitCode::from(EXIT_INTERNAL);
        }
        self.lock = held.lock;
        self.bus = held.bus;
        self.watch = held.watch;
        match crate::run::spawn_guarded(command, self.lock.as_ref().map(AsFd::as_fd), placement) {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                self.command = pid;
                self.tell(&format!("started {}", child.id()));
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                self.tell(&format!("failed {errno} {e}"));
                self.deliver();
                return ExitCode::from(EXIT_INTERNAL);
            }
        }
        // `self.lock` and `self.bus` are held until the last descendant is gone: this is the
        // point of the keeper.
        loop {
            if self.reap() {
                self.tell("gone");
                self.deliver();
                return ExitCode::SUCCESS;
            }
            let Some(control) = &self.control else {
                if self.wrapper_left {
                    self.keep_lock_file();
                }
                self.stop_everything();
                return ExitCode::SUCCESS;
            };
            let mut fds = [
                rustix::event::PollFd::new(control, self.control_interest()),
                rustix::event::PollFd::new(&self.sigchld, rustix::event::PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    say!("unique-instance: keeper: poll: {e}");
                    // Nothing left to wait with: treat it as the wrapper's loss, which stops
                    // the tree and waits for it with the simplest means.
                    self.control = None;
                    continue;
                }
            }
            self.drain_sigchld();
            self.read_control();
            self.flush();
        }
    }

    /// What to wait for on the control socket: always what the wrapper sends (it must never
    /// wait for room while we wait for it to read), and room when something is to be sent.
    fn control_interest(&self) -> rustix::event::PollFlags {
        if self.outbox.is_empty() && !self.reaped_due {
            rustix::event::PollFlags::IN
        } else {
            rustix::event::PollFlags::IN | rustix::event::PollFlags::OUT
        }
    }

    /// Before exiting: sends what is queued, reading (and carrying out) what the wrapper sends
    /// meanwhile, until all of it is sent or the wrapper is gone. No child is left to signal
    /// by then, so the wrapper's last orders change nothing.
    fn deliver(&mut self) {
        self.flush();
        while let Some(control) = &self.control {
            if self.outbox.is_empty() && !self.reaped_due {
                return;
            }
            let mut fds = [rustix::event::PollFd::new(control, self.control_interest())];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    say!("unique-instance: keeper: poll: {e}");
                    return;
                }
            }
            self.read_control();
            self.flush();
        }
    }

    /// Reaps every child that has ended, telling the wrapper; true when no child is left.
    fn reap(&mut self) -> bool {
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    // Its PID may be reused now, by a process never sent anything.
                    self.sent_term.remove(&pid);
                    if Some(pid) == self.command {
                        self.command = None;
                        self.tell(&format!("exited {}", status.as_raw()));
                    } else {
                        // One notice for many: the wrapper only looks again at who is left.
                        self.reaped_due = true;
                        self.flush();
                    }
                }
                Ok(None) => return false,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::CHILD) => return true,
                Err(e) => {
                    say!("unique-instance: keeper: wait: {e}");
                    return false;
                }
            }
        }
    }

    fn drain_sigchld(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.sigchld).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Has the wrapper's end of the socket closed (without anything left to read)?
    fn wrapper_gone(&self) -> bool {
        let Some(control) = &self.control else {
            return true;
        };
        let mut fds = [rustix::event::PollFd::new(
            control,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(1))
            && fds[0].revents().contains(rustix::event::PollFlags::HUP)
    }

    /// Whether the wrapper has exited, waiting up to a second for it: its control socket closes
    /// while it exits, a moment before the exit completes (its pidfd becomes readable then). A
    /// socket that failed with the wrapper alive is not an exit. Unknown without a pidfd: not
    /// taken for exited (a new inotify instance is safe, only blind to what came before).
    fn wrapper_exited(&self) -> bool {
        let Some(pidfd) = &self.wrapper else {
            return false;
        };
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        let second = rustix::event::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            match rustix::event::poll(&mut fds, Some(&second)) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(ready) => return ready == 1,
                Err(_) => return false,
            }
        }
    }

    /// Reads what the wrapper sent and does it; at end of file, notes that the wrapper is gone.
    /// Reads at most a bounded batch, so that reaping and sending are not held up by a wrapper
    /// that sends without end.
    fn read_control(&mut self) {
        let Some(control) = &self.control else {
            return;
        };
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
        let mut buf = [0u8; 4096];
        let mut gone = false;
        let mut truncated = false;
        for _ in 0..64 {
            // The one descriptor a `lock` line brings comes with a message of its own, and a
            // read stops after it: more in one read (or more than fit) is a protocol error.
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut ancillary = RecvAncillaryBuffer::new(&mut space);
            let message = rustix::net::recvmsg(
                control,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut ancillary,
                RecvFlags::CMSG_CLOEXEC,
            );
            let before = self.received.len();
            for part in ancillary.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = part {
                    self.received.extend(fds);
                }
            }
            match message {
                Ok(message)
                    if message.flags.contains(ReturnFlags::CTRUNC)
                        || self.received.len() > before + 1 =>
                {
                    truncated = true;
                    break;
                }
                Ok(message) if message.bytes == 0 => {
                    gone = true;
                    break;
                }
                Ok(message) => self.inbox.extend_from_slice(&buf[..message.bytes]),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if truncated {
            return self.protocol_error("more descriptors than a `lock` order brings", "");
        }
        // Our children, listed once for a batch of orders (nothing is reaped meanwhile: we are
        // the only one who reaps), and again only for a PID not among them.
        let mut children = None;
        let mut start = 0;
        while let Some(end) = self.inbox[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.inbox[start..start + end]).into_owned();
            start += end + 1;
            if let Err(problem) = parse_order(&line).and_then(|o| self.obey(o, &mut children)) {
                return self.protocol_error(&problem, &line);
            }
        }
        self.inbox.drain(..start);
        if self.inbox.len() > MAX_ORDER {
            let line = String::from_utf8_lossy(&self.inbox[..MAX_ORDER]).into_owned();
            return self.protocol_error("a line too long", &line);
        }
        // A descriptor comes with the first byte of its `lock` line: one may wait for the rest
        // of its line, no other may wait at all.
        if self.received.len() > usize::from(!self.inbox.is_empty()) {
            let line = String::from_utf8_lossy(&self.inbox).into_owned();
            return self.protocol_error("a descriptor with no `lock` order", &line);
        }
        if gone {
            self.control = None;
            self.wrapper_left = true;
        }
    }

    /// The wrapper sent something it never sends: it cannot be trusted to decide any more. As
    /// when it is gone, the socket is dropped and the keeper stops the tree itself, holding the
    /// instance until the last process is gone (the wrapper sees the end of file).
    fn protocol_error(&mut self, problem: &str, line: &str) {
        let shown: String = line.chars().take(80).collect();
        say!(
            "unique-instance: keeper: protocol error on the control socket ({problem}: \
             {shown:?}); stopping COMMAND and everything it started, as when the wrapper is gone"
        );
        self.control = None;
        self.inbox.clear();
        self.outbox.clear();
        self.received.clear();
        self.reaped_due = false;
    }

    /// Carries out one order of the wrapper. `children` caches our children for a batch. An
    /// error is a protocol error.
    fn obey(
        &mut self,
        order: Order,
        children: &mut Option<std::collections::HashSet<Pid>>,
    ) -> Result<(), String> {
        let (pid, signal) = match order {
            Order::Kill { pid, signal } => (pid, signal),
            Order::Lock { dev, ino } => return self.take_lock(dev, ino),
            Order::Delivered { signal } => {
                self.tree_got_term |= signal == Signal::TERM;
                return Ok(());
            }
        };
        // Only our own child, not reaped yet: its PID cannot have been reused. A child
        // re-parented to us since the list was made is found by listing again.
        let list = || -> std::collections::HashSet<Pid> {
            children_in(Path::new("/proc"), rustix::process::getpid())
                .into_iter()
                .collect()
        };
        let mut ours =
            Some(pid) == self.command || children.get_or_insert_with(list).contains(&pid);
        if !ours {
            ours = children.insert(list()).contains(&pid);
        }
        if !ours {
            tracing::debug!(
                ?pid,
                "keeper: not a child of ours (any more); not signalled"
            );
            return Ok(());
        }
        match rustix::process::kill_process(pid, signal) {
            Ok(()) if signal == Signal::TERM => {
                self.sent_term.insert(pid);
            }
            Ok(()) => {}
            Err(e) => tracing::debug!(?pid, error = %e, "keeper: cannot signal"),
        }
        Ok(())
    }

    /// `lock DEV INO`: holds the descriptor that came with it, once checked, instead of the
    /// lock file held until now (removed: it keeps no copy out any more).
    fn take_lock(&mut self, dev: u64, ino: u64) -> Result<(), String> {
        if self.lock.is_none() {
            return Err("a lock file, though `go` gave none".into());
        }
        let fd = self
            .received
            .pop_front()
            .ok_or("no descriptor came with it")?;
        self.lock = Some(check_lock(fd, dev, ino)?);
        Ok(())
    }

    /// Queues one line for the wrapper, if it is still there, and sends what the socket takes
    /// now; the rest goes when the main loop finds room. Only the few lines that happen once
    /// (`started`, `failed`, `error`, `exited`, `gone`) are queued like this, so the queue stays
    /// small whatever the wrapper does.
    fn tell(&mut self, line: &str) {
        if self.control.is_none() {
            return;
        }
        self.outbox.extend_from_slice(line.as_bytes());
        self.outbox.push(b'\n');
        self.flush();
    }

    /// Writes what is queued for the wrapper, as much as the socket takes without blocking.
    fn flush(&mut self) {
        let Some(control) = &self.control else {
            return;
        };
        let mut gone = false;
        loop {
            if self.outbox.is_empty() {
                if !self.reaped_due {
                    break;
                }
                self.reaped_due = false;
                self.outbox.extend_from_slice(b"reaped\n");
            }
            match (&*control).write(&self.outbox) {
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Gone: it will never read it.
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            self.control = None;
            self.wrapper_left = true;
            self.outbox.clear();
        }
    }

    /// The wrapper is gone: from now on the keeper keeps the lock file as the wrapper did. It
    /// names itself in the record and watches the file, re-creating it when it is removed, with
    /// the library's own code ([`HandedLockFile`]; checked there: the descriptor must be the
    /// lock file the wrapper's options plan, held through it). A descriptor that came without
    /// the whole of its `lock` line (the wrapper was killed while it sent it) is the file the
    /// wrapper re-created: tried first, so that the record named and the file kept are the one
    /// at the path, not the removed one. If none can be kept so, the lock is held as it was
    /// (unwatched), and the keeper says why.
    ///
    /// It is watched with the wrapper's own inotify instance when `go` gave it
    /// ([`HandedLockFile::with_watch`]): its queue holds what the wrapper never read (it was
    /// stopped while its file was moved away, another copy came and went, and the file was
    /// moved back), which a new instance, made only now, would never show.
    fn keep_lock_file(&mut self) {
        if self.lock.is_none() {
            return;
        }
        let holds_bus = bus_still_connected(&mut self.bus);
        // The wrapper's instance is read only once the wrapper is gone for sure: a socket error
        // with the wrapper alive (its watch still reading the same queue) would split the
        // events between the two, and neither would see what they say together.
        if self.watch.is_some() && !self.wrapper_exited() {
            tracing::debug!("the wrapper has not exited: a new inotify instance instead");
            self.watch = None;
        }
        let mut failure = None;
        if let Some(options) = &self.options {
            for fd in self.received.iter().rev().chain(self.lock.iter()) {
                // A duplicate: what cannot be kept stays held as it was.
                let kept = fd.try_clone().map_err(|e| e.to_string()).and_then(|fd| {
                    match &self.watch {
                        // Never a new instance instead: it would not know what the wrapper's
                        // queue says.
                        Some(watch) => {
                            watch
                                .try_clone()
                                .map_err(|e| e.to_string())
                                .and_then(|watch| {
                                    HandedLockFile::with_watch(options, fd, holds_bus, watch)
                                        .map_err(|e| e.to_string())
                                })
                        }
                        None => {
                            HandedLockFile::new(options, fd, holds_bus).map_err(|e| e.to_string())
                        }
                    }
                });
                match kept {
                    Ok(kept) => {
                        self.kept = Some(kept);
                        break;
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(kept) = &self.kept {
            if kept.watch_descriptor().is_none() {
                say!(
                    "unique-instance: keeper: cannot watch the lock file with inotify (the \
                     limit of inotify instances reached?); it looks at it every {RESCAN:?} \
                     instead"
                );
            }
            // Held through `kept` now; the others are removed files, which keep no copy out.
            self.lock = None;
            self.received.clear();
            self.watch = None;
            return;
        }
        let Some(failure) = failure else {
            // No options (unit tests): held as it was.
            if let Some(lock) = &self.lock {
                name_self_in_record(lock, holds_bus);
            }
            return;
        };
        // Not the lock file at the path any more (moved away, its directory moved or gone), or
        // not one that can be watched: another copy may lock whatever the path leads to now.
        // It was once held on "unwatched", and a copy started then ran beside COMMAND (a
        // review): it is let go instead, and what is left is stopped as for any loss.
        let bus = if holds_bus {
            "the bus name still holds the instance"
        } else {
            "nothing else holds it"
        };
        say!(
            "unique-instance: keeper (pid {}): cannot keep the lock file ({failure}): the path \
             may lead elsewhere by now, so it excludes no other copy any more; {bus}",
            std::process::id()
        );
        self.unkept = self.lock.take();
        self.received.clear();
        self.watch = None;
    }

    /// Looks at the lock file kept since the wrapper left, re-creating it if it was removed
    /// (see [`Keeper::keep_lock_file`]). Once it cannot be kept (re-created too often, replaced,
    /// its directory gone), it excludes no copy any more: it is let go, and said.
    fn check_kept(&mut self) {
        let Some(kept) = &self.kept else {
            return;
        };
        match kept.check() {
            HandedLockState::Recreated => {
                say!(
                    "unique-instance: keeper (pid {}): the lock file {} was removed; re-created \
                     it, and the instance is still held",
                    std::process::id(),
                    kept.path().display()
                );
            }
            HandedLockState::Lost => {
                let bus = if bus_still_connected(&mut self.bus) {
                    "the bus name still holds the instance"
                } else {
                    "nothing else holds it"
                };
                say!(
                    "unique-instance: keeper (pid {}): the lock file {} was removed or replaced \
                     and is not re-created (another copy made a file there, its directory went, \
                     it was removed more than 16 times within a second, or its removal was not \
                     seen happen: no inotify): it excludes no other copy any more; {bus}",
                    std::process::id(),
                    kept.path().display()
                );
                // Still held until the keeper exits: the file may still be at the path for a
                // copy that can follow it (the keeper could not), and need not be free then.
                self.let_go = self.kept.take();
            }
            _ => {}
        }
    }

    /// The wrapper is gone: stops COMMAND and every descendant, and returns once none is left.
    /// While the keeper holds the instance (the lock file, or the bus connection that owns the
    /// name), nothing excludes a new copy but the keeper itself, and it exits only once
    /// the last descendant is gone: they get SIGTERM (and SIGCONT, so that a stopped one acts on
    /// it), and SIGKILL after `--kill-after`. Holding nothing (`--backend dbus` on a bus whose
    /// socket could not be handed over, or once the bus closed that connection: the name is
    /// free), nothing excludes a new copy any more: SIGKILL at once, as `PR_SET_PDEATHSIG` did
    /// before there was a keeper.
    fn stop_everything(&mut self) {
        // Before anything is said: the file may have been removed already.
        let had_lock = self.kept.is_some() || self.unkept.is_some();
        self.check_kept();
        let mut holding =
            self.lock.is_some() || self.kept.is_some() || bus_still_connected(&mut self.bus);
        let (mut deadline, mut signal) = if holding {
            let term = if self.tree_got_term {
                "already sent SIGTERM by the service manager"
            } else if !self.sent_term.is_empty() {
                "SIGTERM now to what was not sent it already"
            } else {
                "SIGTERM now"
            };
            say!(
                "unique-instance: the wrapper is gone; its keeper (pid {}) holds the instance \
                 while it stops COMMAND and everything it started ({term}, SIGKILL in {:?})",
                std::process::id(),
                self.kill_after
            );
            (Instant::now().checked_add(self.kill_after), Signal::TERM)
        } else {
            (Some(Instant::now()), Signal::KILL)
        };
        if !holding {
            nothing_held(if had_lock { LOCK_LOST } else { NO_BUS });
        }
        let mut signalled = std::collections::HashSet::new();
        let me = rustix::process::getpid();
        loop {
            if self.reap() {
                return;
            }
            if holding
                && self.lock.is_none()
                && self.kept.is_none()
                && !bus_still_connected(&mut self.bus)
            {
                holding = false;
                nothing_held(if had_lock { LOCK_LOST } else { NO_BUS });
                deadline = Some(Instant::now());
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                signal = Signal::KILL;
            }
            for (pid, parent) in descendants(Path::new("/proc"), me) {
                // Sent SIGTERM already: only continued, so that a stopped one acts on it.
                let now = if signal == Signal::TERM
                    && (self.tree_got_term || self.sent_term.contains(&pid))
                {
                    Signal::CONT
                } else {
                    signal
                };
                // One not signalled now (it changed parents since the walk) is found again.
                if !signalled.contains(&(pid, now.as_raw()))
                    && signal_descendant(pid, parent, me, now)
                {
                    signalled.insert((pid, now.as_raw()));
                }
            }
            let wait = match left {
                Some(left) if signal == Signal::TERM => left.min(RESCAN),
                _ => RESCAN,
            };
            let timeout = rustix::event::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            // And the kept lock file's watch: a change is looked at at once.
            let watch = self
                .kept
                .as_ref()
                .and_then(HandedLockFile::watch_descriptor);
            let mut fds = vec![rustix::event::PollFd::new(
                &self.sigchld,
                rustix::event::PollFlags::IN,
            )];
            if let Some(watch) = &watch {
                fds.push(rustix::event::PollFd::new(
                    watch,
                    rustix::event::PollFlags::IN,
                ));
            }
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
            drop(fds);
            self.drain_sigchld();
            // At once on a change, and at least every RESCAN: without inotify, or with a
            // directory on the way left unwatched, nothing else would say.
            self.check_kept();
        }
    }
}

/// The wrapper is gone and the keeper alone holds the instance: the record still names the
/// wrapper, a dead process, which refused copies would report as "holder unknown" after the
/// grace a record gets. The keeper names itself instead (its PID, start time and executable),
/// and, while it holds the bus connection (`holds_bus`), keeps the bus and unique name the
/// wrapper's record gives: the name is still owned through the socket it holds, and `status`
/// sees one holder of both, the keeper (the bus itself still gives the wrapper's PID for the
/// connection, which is never named once dead). A failure only costs that name: it is said, and
/// the tree is stopped all the same.
fn name_self_in_record(lock: &OwnedFd, holds_bus: bool) {
    let named = if holds_bus {
        unique_instance::record_this_process_as_holder_keeping_bus_name(lock.as_fd())
    } else {
        unique_instance::record_this_process_as_holder(lock.as_fd())
    };
    if let Err(e) = named {
        say!("unique-instance: keeper: cannot name itself as the holder in the lock file: {e}");
    }
}

/// What went, for [`nothing_held`]: the bus name, with no lock file held.
const NO_BUS: &str = "the bus name with it (no lock file held)";
/// What went, for [`nothing_held`]: the lock file kept since (and the bus name, if any).
const LOCK_LOST: &str = "the lock file could not be kept";

/// Says that nothing holds the instance any more (`what` went), so that what is left is killed
/// at once.
fn nothing_held(what: &str) {
    say!(
        "unique-instance: the wrapper is gone, and {what}; nothing holds the instance, so \
         COMMAND and everything it started are killed (SIGKILL)"
    );
}

/// Does the bus connection whose socket the keeper holds still exist? The bus closes it when it
/// drops the connection (it exited, or dropped us); the name is then free, and the duplicate
/// is let go. Only the socket's state is looked at: nothing is ever read from it.
fn bus_still_connected(bus: &mut Option<OwnedFd>) -> bool {
    let Some(socket) = bus else {
        return false;
    };
    // No event asked for: poll reports only a hang-up or an error.
    let mut fds = [rustix::event::PollFd::new(
        socket,
        rustix::event::PollFlags::empty(),
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let closed = matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(1))
        && fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR);
    if closed {
        *bus = None;
    }
    !closed
}

/// The longest line the wrapper sends (`kill PID SIGNAL`, `lock DEV INO`, `delivered
/// SIGNAL`), with room.
const MAX_ORDER: usize = 64;

/// An order of the wrapper.
#[derive(Debug, PartialEq, Eq)]
enum Order {
    /// Send `signal` to `pid`, if it is still our child.
    Kill { pid: Pid, signal: Signal },
    /// Hold the lock file (`dev`, `ino`) whose descriptor came with the line.
    Lock { dev: u64, ino: u64 },
    /// The service manager sent `signal` to every process of the unit.
    Delivered { signal: Signal },
}

/// Parses one line of the wrapper (without its newline); the error says what is wrong with it.
fn parse_order(line: &str) -> Result<Order, String> {
    if let Some(signal) = line.strip_prefix("delivered ") {
        return Ok(Order::Delivered {
            signal: forwarded_signal(signal)?,
        });
    }
    let mut words = line.split(' ');
    let (Some(word @ ("kill" | "lock")), Some(pid), Some(signal), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(
            "not an order of the form `kill PID SIGNAL`, `lock DEV INO` or `delivered SIGNAL`"
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

/// Every descendant of `me`, each with its parent, found through the `/proc` mounted at `proc`.
fn descendants(proc: &Path, me: Pid) -> Vec<(Pid, Pid)> {
    let mut found = Vec::new();
    let mut parents = vec![me];
    while let Some(parent) = parents.pop() {
        for child in children_in(proc, parent) {
            // A PID cycle cannot be, but a PID reused mid-walk could make one.
            if child == me || found.iter().any(|&(p, _)| p == child) {
                continue;
            }
            found.push((child, parent));
            parents.push(child);
        }
    }
    found
}

/// Sends `signal` to `pid`, a descendant found as a child of `parent`; false when it was not
/// signalled because its parent changed since the walk. Our own children cannot change identity
/// before we reap them; any other is pinned by a pidfd and signalled only if its parent is still
/// `parent`, or is us (its parent died and it was re-parented to us: the parent may be one we
/// have just signalled) — a process that took a reused PID since the walk is then either not
/// signalled or, having the same parent, a descendant too.
fn signal_descendant(pid: Pid, parent: Pid, me: Pid, signal: Signal) -> bool {
    // A stopped process acts on SIGTERM only once continued (SIGKILL needs no SIGCONT).
    let and_continue = signal == Signal::TERM;
    if parent == me {
        let _ = rustix::process::kill_process(pid, signal);
        if and_continue {
            let _ = rustix::process::kill_process(pid, Signal::CONT);
        }
        return true;
    }
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => Some(pidfd),
        // Gone already.
        Err(rustix::io::Errno::SRCH) => return true,
        // No pidfd for it: a kernel without them (before 5.3, ENOSYS), a seccomp profile that
        // does not list `pidfd_open` (EPERM), no descriptor left (EMFILE). The plain signal then,
        // after the same check of its parent; taking it for gone would leave it running, and
        // the instance held, past `--kill-after`.
        Err(_) => None,
    };
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()));
    let now = stat.ok().as_deref().and_then(parent_in_stat);
    if now == Some(parent.as_raw_nonzero().get()) || now == Some(me.as_raw_nonzero().get()) {
        let send = |signal| match &pidfd {
            Some(pidfd) => rustix::process::pidfd_send_signal(pidfd, signal),
            None => rustix::process::kill_process(pid, signal),
        };
        let _ = send(signal);
        if and_continue {
            let _ = send(Signal::CONT);
        }
        return true;
    }
    // Exited (not even a zombie any more) counts as done; another parent is looked at again on
    // the next walk.
    now.is_none()
}

// ---------------------------------------------------------------------------------------------
// The wrapper's side

/// Why COMMAND could not be started.
pub(crate) enum StartError {
    /// COMMAND itself could not be executed.
    Command(io::Error),
    /// The keeper could not be executed with COMMAND's arguments and its own: together (with
    /// the environment) they are over the kernel's limit (`E2BIG`).
    TooLong,
    /// The keeper could not be started, or could not do its job.
    Keeper(String),
}

/// Any other failure to start the keeper, said in words.
impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError::Keeper(message)
    }
}

impl From<&str> for StartError {
    fn from(message: &str) -> Self {
        StartError::Keeper(message.to_owned())
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Command(e) => write!(f, "COMMAND: {e}"),
            StartError::TooLong => f.write_str("the keeper's arguments are too long (E2BIG)"),
            StartError::Keeper(message) => write!(f, "the keeper: {message}"),
        }
    }
}

/// What the keeper reports.
pub(crate) enum Event {
    /// COMMAND ended, with this status.
    Exited(ExitStatus),
    /// Another child of the keeper ended.
    Reaped,
    /// The keeper has no child left and exits, or has ended (see [`Handle::finish`]).
    Gone,
}

/// The wrapper's handle on its keeper.
pub(crate) struct Handle {
    process: tokio::process::Child,
    pid: Pid,
    control: tokio::net::UnixStream,
    inbox: Vec<u8>,
    /// Orders not sent yet: they are written while waiting for the keeper's next line (see
    /// [`Handle::next_event`]), never in a wait of their own.
    outbox: Vec<u8>,
    /// The descriptors that go with lines of the outbox, each with the offset of its line's
    /// first byte there: sent with that byte, and alone (see [`Handle::try_flush`]).
    attached: std::collections::VecDeque<(usize, OwnedFd)>,
    closed: bool,
}

/// A keeper started and waiting for the wrapper's `go`: it has started nothing and holds
/// nothing.
pub(crate) struct Pending {
    process: tokio::process::Child,
    pid: Pid,
    control: tokio::net::UnixStream,
}

/// Starts the keeper, which starts COMMAND; returns once COMMAND runs, with its PID.
pub(crate) async fn start(
    command: &[OsString],
    instance: &InstanceArgs,
    notify: bool,
    held: Handed<'_>,
    kill_after: Duration,
    ignored: u64,
) -> Result<(Handle, Pid), StartError> {
    spawn(command, instance, notify, kill_after, ignored)?
        .go(held)
        .await
}

/// What the wrapper hands its keeper with `go`: the guard's descriptors, from
/// [`unique_instance::InstanceGuard::lock_file_descriptor`],
/// [`unique_instance::InstanceGuard::lock_file_watch_descriptor`] (sent only with a lock) and
/// [`unique_instance::InstanceGuard::bus_socket_descriptor`].
#[derive(Clone, Copy)]
pub(crate) struct Handed<'a> {
    pub(crate) lock: Option<BorrowedFd<'a>>,
    pub(crate) watch: Option<BorrowedFd<'a>>,
    pub(crate) bus: Option<BorrowedFd<'a>>,
}

/// Starts the keeper, which then waits for [`Pending::go`] (or its end, [`Pending::abandon`]).
/// Returns once it runs (`exec` succeeded).
#[allow(unsafe_code)]
pub(crate) fn spawn(
    command: &[OsString],
    instance: &InstanceArgs,
    notify: bool,
    kill_after: Duration,
    ignored: u64,
) -> Result<Pending, StartError> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    ours.set_nonblocking(true)
        .map_err(|e| format!("socket: {e}"))?;
    let control = tokio::net::UnixStream::from_std(ours).map_err(|e| format!("socket: {e}"))?;
    let theirs_raw = theirs.as_raw_fd();
    // Not rustix's, which takes 0 for impossible.
    let group = nix::unistd::getpgrp().as_raw();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("unique-instance")
        .arg(SUBCOMMAND)
        .arg("--control-fd")
        .arg(theirs_raw.to_string())
        .arg("--kill-after")
        .arg(kill_after.as_secs_f64().to_string())
        .arg("--process-group")
        .arg(group.to_string())
        // What the keeper plans its lock file from, to keep it once we are gone.
        .args(instance.to_args());
    // Only when there are any: the usual command line stays as it was.
    if ignored != 0 {
        let list: Vec<String> = FORWARDED
            .into_iter()
            .filter(|&signal| ignored & signal_bit(signal) != 0)
            .map(|signal| signal.to_string())
            .collect();
        cmd.arg("--ignored-signals").arg(list.join(","));
    }
    // A process group of its own (in our session), so that a kill of our whole group (`kill -9
    // -PGID`, a supervisor's group kill) leaves it to stop what COMMAND started; COMMAND joins
    // ours (see `spawn_guarded`), so a terminal's signals and job control still reach it. Our
    // group has no number here when its leader is outside our PID namespace (0: a container
    // entered with `nsenter`): COMMAND could not join it, so the keeper stays in it.
    if group > 0 {
        cmd.process_group(0);
    }
    cmd.arg("--").args(command);
    // With --notify, NOTIFY_SOCKET is for COMMAND only (the keeper passes its own environment
    // on): ours is left alone. LOCK_FD_ENV may come from an outer `run`: the keeper sets
    // COMMAND's. Each is removed only when it is set: any change to the environment makes std
    // copy and sort all of it for the child, which costs more than the rest of `spawn`
    // (callgrind), on the winner's way to COMMAND.
    for (variable, remove) in [("NOTIFY_SOCKET", notify), (LOCK_FD_ENV, true)] {
        if remove && std::env::var_os(variable).is_some() {
            cmd.env_remove(variable);
        }
    }
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed: it makes raw system calls (sigaction, fcntl), allocates nothing and
    // takes no locks. `theirs_raw` names `theirs`, which this process keeps open until `spawn`
    // has returned.
    unsafe {
        cmd.pre_exec(move || {
            // Ignored across exec: the keeper never dies of a signal meant for COMMAND, not even
            // one that comes before it could set anything up. No PR_SET_PDEATHSIG: the keeper
            // must outlive us, to stop what COMMAND started if we are killed.
            for signal in FORWARDED {
                let signal = nix::sys::signal::Signal::try_from(signal)?;
                nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn)?;
            }
            rustix::io::fcntl_setfd(
                BorrowedFd::borrow_raw(theirs_raw),
                rustix::io::FdFlags::empty(),
            )?;
            Ok(())
        });
    }
    let process =
        tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| match e.raw_os_error() {
                Some(e2big) if e2big == rustix::io::Errno::TOOBIG.raw_os_error() => {
                    StartError::TooLong
                }
                _ => StartError::Keeper(format!("cannot execute /proc/self/exe: {e}")),
            })?;
    drop(theirs);
    let pid = process
        .id()
        .and_then(|id| Pid::from_raw(id as i32))
        .ok_or("it has no process id")?;
    Ok(Pending {
        process,
        pid,
        control,
    })
}

impl Pending {
    /// The keeper's PID.
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// Has the keeper ended already (killed while it waited)? It was then never given the lock
    /// and started nothing.
    pub(crate) fn has_ended(&mut self) -> bool {
        !matches!(self.process.try_wait(), Ok(None))
    }

    /// Hands the keeper the lock's duplicate (`lock`, none with `--backend dbus`) and has it start
    /// COMMAND; returns once COMMAND runs, with its PID.
    pub(crate) async fn go(self, held: Handed<'_>) -> Result<(Handle, Pid), StartError> {
        let mut handle = Handle {
            process: self.process,
            pid: self.pid,
            control: self.control,
            inbox: Vec::new(),
            outbox: Vec::new(),
            attached: std::collections::VecDeque::new(),
            closed: false,
        };
        if let Err(e) = handle.send_go(held).await {
            // It ended (its status tells why, below), or cannot be told: without its whole `go`
            // it starts nothing, and would wait for ever.
            tracing::debug!(error = %e, "cannot send the keeper its go");
            let _ = handle.process.start_kill();
        }
        let first = handle.next_line().await;
        let started = first
            .as_deref()
            .and_then(|l| l.strip_prefix("started "))
            .and_then(|p| p.parse().ok())
            .and_then(Pid::from_raw);
        if let Some(command_pid) = started {
            return Ok((handle, command_pid));
        }
        // It ends after any other first word: wait for that, so that it no longer holds the
        // lock.
        let status = handle.finish().await;
        Err(match first.as_deref().map(|l| l.split_once(' ')) {
            Some(Some(("failed", rest))) => {
                let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
                match errno.parse::<i32>() {
                    Ok(errno) if errno > 0 => {
                        StartError::Command(io::Error::from_raw_os_error(errno))
                    }
                    _ => StartError::Command(io::Error::other(message.to_owned())),
                }
            }
            Some(Some(("error", message))) => StartError::Keeper(message.to_owned()),
            _ => StartError::Keeper(format!(
                "it ended before COMMAND started ({})",
                match status {
                    Ok(status) => status.to_string(),
                    Err(e) => e.to_string(),
                }
            )),
        })
    }

    /// The wait ended without the instance: ends the keeper (it holds nothing and has started
    /// nothing) and reaps it, so that nothing of it is left, not even a zombie.
    pub(crate) async fn abandon(mut self) {
        // Its end of file would end it too, but only once it has finished starting up.
        let _ = self.process.start_kill();
        if let Err(e) = self.process.wait().await {
            tracing::debug!(error = %e, "cannot reap the keeper started for the wait");
        }
    }
}

impl Handle {
    /// Sends the keeper its `go`, with the lock's descriptor and the bus socket's (see the
    /// protocol at the top).
    async fn send_go(&mut self, held: Handed<'_>) -> io::Result<()> {
        // Every descriptor goes with the line's first byte, in the order announced.
        let mut line = "go".to_owned();
        let watch = held.watch.filter(|_| held.lock.is_some());
        for (kind, fd) in [("lock", held.lock), ("watch", watch), ("bus", held.bus)] {
            if let Some(fd) = fd {
                // Duplicated first: what is sent is what was looked at (see `queue_lock`).
                let fd = fd.try_clone_to_owned()?;
                let stat = rustix::fs::fstat(&fd)?;
                line.push_str(&format!(" {kind} {} {}", stat.st_dev, stat.st_ino));
                self.attached.push_back((self.outbox.len(), fd));
            }
        }
        line.push('\n');
        self.outbox.extend_from_slice(line.as_bytes());
        while !self.outbox.is_empty() {
            self.control.writable().await?;
            self.try_flush()?;
        }
        Ok(())
    }

    /// Queues `WORDS DEV INO` with a duplicate of `lock` attached. The duplicate is made first
    /// and is what is looked at and sent: the guard's descriptor may be given another file (a
    /// re-created one) at any moment.
    fn queue_lock(&mut self, words: &str, lock: BorrowedFd<'_>) -> io::Result<()> {
        let lock = lock.try_clone_to_owned()?;
        let stat = rustix::fs::fstat(&lock)?;
        self.attached.push_back((self.outbox.len(), lock));
        let line = format!("{words} {} {}\n", stat.st_dev, stat.st_ino);
        self.outbox.extend_from_slice(line.as_bytes());
        Ok(())
    }

    /// Hands the keeper `lock`, the lock file re-created after someone removed it, to hold from
    /// now on instead of the removed one (`lock DEV INO`, see the protocol at the top). Sent now
    /// if the socket has room, else while waiting for the next event, as orders are.
    ///
    /// # Errors
    ///
    /// When the descriptor cannot be duplicated: the keeper holds the removed file only.
    pub(crate) fn hand_lock(&mut self, lock: BorrowedFd<'_>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.queue_lock("lock", lock)?;
        self.flush();
        Ok(())
    }

    /// The next event; [`Event::Gone`] too when the keeper ended without saying so. Orders
    /// queued by [`Handle::signal`] are sent meanwhile.
    pub(crate) async fn next_event(&mut self) -> Event {
        loop {
            let Some(line) = self.next_line().await else {
                return Event::Gone;
            };
            let (word, value) = line.split_once(' ').unwrap_or((&line, ""));
            match word {
                "exited" => {
                    if let Ok(raw) = value.parse::<i32>() {
                        return Event::Exited(ExitStatus::from_raw(raw));
                    }
                }
                "reaped" => return Event::Reaped,
                "gone" => return Event::Gone,
                _ => {}
            }
            tracing::debug!(line, "an unknown line from the keeper; ignored");
        }
    }

    /// The next whole line from the keeper, `None` at end of file; queued orders are sent
    /// while waiting for it, so that we never wait to write while the keeper waits for us to
    /// read. Cancel-safe: what was read stays in the inbox, what was not sent in the outbox.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.inbox.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.inbox.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            if self.closed {
                return None;
            }
            let interest = if self.outbox.is_empty() {
                tokio::io::Interest::READABLE
            } else {
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE
            };
            let ready = match self.control.ready(interest).await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::debug!(error = %e, "the keeper's socket");
                    self.closed = true;
                    continue;
                }
            };
            if ready.is_writable() {
                self.flush();
            }
            if !ready.is_readable() {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.control.try_read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(error = %e, "the keeper's socket");
                    self.closed = true;
                }
            }
        }
    }

    /// Has the keeper send `signal` to `pid`, which must be the keeper's child (COMMAND, or a
    /// process COMMAND left behind). The order is sent now if the socket has room, else while
    /// waiting for the next event: it never blocks, so signals and the keeper's lines are still
    /// handled however many orders there are.
    pub(crate) fn signal(&mut self, pid: Pid, signal: Signal) {
        if self.closed {
            return;
        }
        let line = format!("kill {} {}\n", pid.as_raw_nonzero(), signal.as_raw());
        self.outbox.extend_from_slice(line.as_bytes());
        self.flush();
    }

    /// Tells the keeper that the service manager sent `signal` to every process of the unit,
    /// COMMAND's tree included (`delivered SIGNAL`): were the keeper to stop the tree itself
    /// later, it would not send it again. Queued and sent as [`Handle::signal`]'s orders are.
    pub(crate) fn delivered(&mut self, signal: Signal) {
        if self.closed {
            return;
        }
        let line = format!("delivered {}\n", signal.as_raw());
        self.outbox.extend_from_slice(line.as_bytes());
        self.flush();
    }

    /// Writes what is queued, as much as the socket takes without blocking.
    fn flush(&mut self) {
        if let Err(e) = self.try_flush() {
            // Gone: its end of file says so to the caller.
            tracing::debug!(error = %e, "cannot send the keeper its orders");
            self.outbox.clear();
            self.attached.clear();
        }
    }

    /// [`Handle::flush`], or the error that ended it. A descriptor goes with the first byte of
    /// its line, and never with another's (the keeper takes one for each `lock` line, and the
    /// three of `go` together).
    fn try_flush(&mut self) -> io::Result<()> {
        while !self.outbox.is_empty() {
            let fds: Vec<BorrowedFd<'_>> = self
                .attached
                .iter()
                .take_while(|&&(at, _)| at == 0)
                .map(|(_, fd)| fd.as_fd())
                .collect();
            let end = self
                .attached
                .iter()
                .map(|&(at, _)| at)
                .find(|&at| at > 0)
                .unwrap_or(self.outbox.len());
            let sent = self.control.try_io(tokio::io::Interest::WRITABLE, || {
                let mut space =
                    [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
                let mut ancillary = rustix::net::SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty()
                    && !ancillary.push(rustix::net::SendAncillaryMessage::ScmRights(&fds))
                {
                    return Err(io::Error::other("more descriptors than one line carries"));
                }
                Ok(rustix::net::sendmsg(
                    &self.control,
                    &[io::IoSlice::new(&self.outbox[..end])],
                    &mut ancillary,
                    rustix::net::SendFlags::NOSIGNAL,
                )?)
            });
            let with_fds = fds.len();
            drop(fds);
            match sent {
                Ok(n) => {
                    // Sent with the first byte; the rest of its line follows without them.
                    self.attached.drain(..with_fds);
                    self.outbox.drain(..n);
                    for (at, _) in &mut self.attached {
                        *at -= n;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The keeper's children: once COMMAND has been reaped, what it left behind.
    pub(crate) fn children(&self) -> Vec<Pid> {
        children_in(Path::new("/proc"), self.pid)
    }

    /// Waits for the keeper to exit (after [`Event::Gone`], at once) and returns its status.
    pub(crate) async fn finish(&mut self) -> io::Result<ExitStatus> {
        self.process.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `text` with `fds` attached, as the wrapper sends its `go`.
    fn send(socket: &UnixStream, text: &str, fds: &[BorrowedFd<'_>]) {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut ancillary = rustix::net::SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(ancillary.push(rustix::net::SendAncillaryMessage::ScmRights(fds)));
        }
        let sent = rustix::net::sendmsg(
            socket,
            &[io::IoSlice::new(text.as_bytes())],
            &mut ancillary,
            rustix::net::SendFlags::NOSIGNAL,
        )
        .expect("sendmsg");
        assert_eq!(sent, text.len());
    }

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

    /// `lock DEV INO` with the new lock file's descriptor: the keeper holds that file from then
    /// on. Anything else about it is a protocol error (the socket is dropped, as when the
    /// wrapper is gone), and the keeper keeps the file it held.
    #[test]
    fn a_re_created_lock_file_is_taken_only_as_announced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = std::fs::File::create(dir.path().join("old.lock")).expect("lock file");
        let new = std::fs::File::create(dir.path().join("new.lock")).expect("new lock file");
        let other = std::fs::File::create(dir.path().join("other")).expect("another file");
        let (pipe, _writer) = std::io::pipe().expect("pipe");
        let id = |file: &dyn AsFd| {
            let stat = rustix::fs::fstat(file).expect("fstat");
            (stat.st_dev, stat.st_ino)
        };
        let line = format!("lock {} {}\n", id(&new).0, id(&new).1);
        let kill = "kill 4242 15\n".to_owned();
        let cases: [(&str, bool, &str, Vec<BorrowedFd<'_>>); 7] = [
            ("announced, and sent", true, &line, vec![new.as_fd()]),
            ("announced, none sent", true, &line, vec![]),
            (
                "another file than announced",
                true,
                &line,
                vec![other.as_fd()],
            ),
            ("not a file", true, &line, vec![pipe.as_fd()]),
            ("two sent", true, &line, vec![new.as_fd(), other.as_fd()]),
            ("sent with another order", true, &kill, vec![new.as_fd()]),
            ("no lock given at `go`", false, &line, vec![new.as_fd()]),
        ];
        for (i, (case, holding, text, fds)) in cases.into_iter().enumerate() {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            let mut keeper = Keeper::new(theirs, Duration::from_secs(1)).expect("keeper");
            keeper.lock = holding.then(|| old.as_fd().try_clone_to_owned().expect("dup"));
            send(&ours, text, &fds);
            keeper.read_control();
            let held = keeper.lock.as_ref().map(|fd| id(fd));
            if i == 0 {
                assert!(
                    keeper.control.is_some(),
                    "{case}: still obeying the wrapper"
                );
                assert_eq!(held, Some(id(&new)), "{case}");
                let flags = rustix::io::fcntl_getfd(keeper.lock.as_ref().expect("lock"));
                assert!(flags.expect("getfd").contains(rustix::io::FdFlags::CLOEXEC));
            } else {
                assert!(keeper.control.is_none(), "{case}: a protocol error");
                assert_eq!(held, holding.then(|| id(&old)), "{case}: the old one kept");
                assert!(keeper.received.is_empty(), "{case}");
            }
        }
    }

    /// The wrapper killed while it sent a `lock` line: its descriptor came, its line did not
    /// whole. Once the wrapper is gone, the keeper keeps that file (the one at the path, which
    /// it holds) rather than the removed one, and names itself in it (review rev-cli F1,
    /// related item: the record was written into the removed file).
    #[test]
    fn a_half_sent_lock_is_kept_once_the_wrapper_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("org.example.Half.lock");
        let options = || {
            unique_instance::InstanceOptions::new("org.example.Half")
                .backend(unique_instance::Backend::LockFile)
                .lock_file(&path)
                .watch_lock_file(false)
        };
        // The wrapper's re-created file, at the path and locked.
        let guard = options().acquire().expect("acquire");
        let new = guard.lock_file_descriptor().expect("a lock file");
        let removed = std::fs::File::create(dir.path().join("removed")).expect("a file");
        std::fs::remove_file(dir.path().join("removed")).expect("remove");
        let id = |fd: BorrowedFd<'_>| {
            let stat = rustix::fs::fstat(fd).expect("fstat");
            (stat.st_dev, stat.st_ino)
        };
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut keeper = Keeper::new(theirs, Duration::from_secs(1)).expect("keeper");
        keeper.options = Some(options());
        keeper.lock = Some(OwnedFd::from(removed));
        let line = format!("lock {} {}\n", id(new).0, id(new).1);
        send(&ours, &line[..3], &[new]);
        drop(ours);
        keeper.read_control();
        assert!(keeper.wrapper_left && keeper.received.len() == 1);
        keeper.keep_lock_file();
        let kept = keeper.kept.as_ref().expect("a lock file kept");
        assert_eq!(id(kept.descriptor()), id(new), "the file at the path");
        assert!(keeper.lock.is_none() && keeper.received.is_empty());
        assert_eq!(kept.check(), HandedLockState::Held);
        let record = std::fs::read_to_string(&path).expect("the record");
        assert!(
            record.contains(&format!("\"pid\":{}", std::process::id())),
            "{record}"
        );
        drop(keeper);
        guard.release().expect("release");
    }

    /// The keeper fails closed on a bad order: it drops the socket (the wrapper sees the end
    /// of file) and from then on acts as when the wrapper is gone.
    #[test]
    fn a_bad_order_on_the_socket_drops_the_wrapper() {
        for garbage in ["kill -1 9\n", "hello\n", "kill 1 15 15\n"] {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            let mut keeper = Keeper::new(theirs, Duration::from_secs(1)).expect("keeper");
            (&ours).write_all(garbage.as_bytes()).expect("write");
            keeper.read_control();
            assert!(keeper.control.is_none(), "{garbage:?}");
            let mut rest = Vec::new();
            (&ours).read_to_end(&mut rest).expect("end of file");
            assert!(rest.is_empty(), "{garbage:?}: {rest:?}");
        }
        // Nor does an endless line grow without bound.
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut keeper = Keeper::new(theirs, Duration::from_secs(1)).expect("keeper");
        (&ours).write_all(&[b'7'; 4096]).expect("write");
        keeper.read_control();
        assert!(keeper.control.is_none());
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
