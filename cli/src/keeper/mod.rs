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
//!   the unit, COMMAND's tree included, so the wrapper did not pass it on (see below);
//! - wrapper to keeper: `tree SIGNAL` — the wrapper lost the instance: COMMAND and every other
//!   descendant get SIGNAL at once (15: SIGTERM, with SIGCONT, and only SIGCONT for one sent
//!   SIGTERM already; 9: SIGKILL, `--kill-after` later), so that the whole tree, not COMMAND
//!   alone, is gone within one `--kill-after` of the loss. Were the wrapper to die meanwhile,
//!   the keeper keeps that deadline. Any other line is a protocol error: the keeper drops the socket and acts as when the wrapper is gone
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
//! SIGCHLD pipe; it allocates nothing between fork and exec, and never panics. Its messages are
//! written by a second thread (say.rs), so that a stderr nobody reads never holds up the
//! stopping of the tree; that thread is never needed between fork and exec.

mod handle;
mod orders;
mod process;

pub(crate) use handle::{Event, Handed, Handle, Pending, StartError, spawn, start};

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::process::Pid;

use crate::cli::KeeperArgs;
use crate::run::{FORWARDED, signal_bit};
use crate::{EXIT_INTERNAL, EXIT_USAGE, ExitCode, fail};
use orders::{Go, adopt, await_go};
use process::Keeper;

/// The first argument that makes the binary the keeper (see `main`).
pub(crate) const SUBCOMMAND: &str = "internal-keeper";

/// While the wrapper is gone and the tree is being stopped, how often the keeper looks again for
/// descendants: one re-parented to it when its own parent died is announced by no SIGCHLD.
const RESCAN: Duration = Duration::from_millis(200);

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
        Ok(mut keeper) => {
            keeper.options = Some(args.instance.options());
            keeper
        }
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

/// What the tests of more than one side share.
#[cfg(test)]
mod testing {
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::os::unix::net::UnixStream;

    /// Sends `text` with `fds` attached, as the wrapper sends its `go`.
    pub(super) fn send(socket: &UnixStream, text: &str, fds: &[BorrowedFd<'_>]) {
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
}
