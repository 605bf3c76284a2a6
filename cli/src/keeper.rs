//! The keeper: the process `run` puts between itself and COMMAND, so that nothing COMMAND
//! started outlives the instance, even when the wrapper is killed by SIGKILL.
//!
//! The wrapper (`run`) re-executes its own binary (`/proc/self/exe internal-keeper ...`, an
//! entry point that no help, man page or completion shows) as the keeper, handing it a duplicate of the lock's open file description
//! and one end of a control socket. The keeper is a child subreaper and starts COMMAND
//! ([`crate::run::spawn_guarded`]): every process COMMAND starts and leaves orphaned is
//! re-parented to the keeper, so the keeper has a child until the whole tree is gone, and it
//! holds the lock until then — whatever the processes did to their descriptors, credentials,
//! process group or session.
//!
//! While the wrapper lives it decides everything (which signals COMMAND gets, the loss of the
//! instance, `--kill-after`, the exit status) and the keeper carries it out. The protocol, one
//! text line per message on the socket:
//! - wrapper to keeper: `kill PID SIGNAL` — sent only while PID is the keeper's own child, not
//!   yet reaped (so never to a reused PID);
//! - keeper to wrapper: `started PID` (COMMAND runs), `failed ERRNO MESSAGE` (COMMAND could not
//!   be started), `error MESSAGE` (the keeper cannot do its job), `exited STATUS` (COMMAND's raw
//!   wait status), `reaped PID` (another child of the keeper ended), `gone` (no child is left;
//!   the keeper exits).
//!
//! When the wrapper dies (end of file on the socket) the keeper stops the tree itself: SIGTERM
//! to every descendant, SIGKILL after `--kill-after`, and exits once none is left. A descendant
//! it cannot signal (another user's, when the keeper is not root) is waited for: exclusion holds
//! until it is gone. The keeper ignores the signals the wrapper passes on (the wrapper starts it
//! with them ignored, and COMMAND gets their defaults back): a terminal's Ctrl-C or systemd's
//! SIGTERM to the whole cgroup reaches the keeper too, and the wrapper decides what COMMAND gets.
//!
//! Not covered: the keeper itself killed by SIGKILL (the OOM killer, `kill -9` of the whole
//! group). COMMAND then dies by `PR_SET_PDEATHSIG` unless it changed its credentials, and what
//! still holds the inherited lock descriptor keeps the instance held; a descendant that closed
//! it runs on unguarded.
//!
//! The keeper is small and synchronous: one thread, no runtime, `poll` on the socket and on a
//! SIGCHLD pipe; it allocates nothing between fork and exec, and never panics.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::cli::KeeperArgs;
use crate::run::{FORWARDED, LOCK_FD_ENV, children_in, duplicate_high, parent_in_stat};
use crate::{EXIT_INTERNAL, EXIT_USAGE, fail};

/// The first argument that makes the binary the keeper (see `main`).
pub(crate) const SUBCOMMAND: &str = "internal-keeper";

/// While the wrapper is gone and the tree is being stopped, how often the keeper looks again for
/// descendants: one re-parented to it when its own parent died is announced by no SIGCHLD.
const RESCAN: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// The keeper process

/// The keeper's entry point (`unique-instance internal-keeper ...`).
pub(crate) fn keeper(args: KeeperArgs) -> ExitCode {
    let (control, lock) = match adopt_descriptors(&args) {
        Ok(fds) => fds,
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
    let mut keeper = match Keeper::new(control, args.kill_after) {
        Ok(keeper) => keeper,
        Err(e) => {
            return fail(
                EXIT_INTERNAL,
                format_args!("keeper: cannot watch its control socket: {e}"),
            );
        }
    };
    keeper.run(&args.command, lock)
}

/// Takes over the descriptors `run` handed down, after checking they are what it hands down: the
/// control socket and the lock file (a regular file). Both become close-on-exec here, so that
/// COMMAND inherits only the one duplicate of the lock `spawn_guarded` makes for it.
fn adopt_descriptors(args: &KeeperArgs) -> Result<(UnixStream, Option<OwnedFd>), String> {
    let control = adopt(args.control_fd, rustix::fs::FileType::Socket)?;
    let lock = args
        .lock_fd
        .map(|fd| adopt(fd, rustix::fs::FileType::RegularFile))
        .transpose()?;
    Ok((UnixStream::from(control), lock))
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
    /// Readable when a SIGCHLD came (signal-hook writes to the other end).
    sigchld: UnixStream,
    /// COMMAND, until it has been reaped.
    command: Option<Pid>,
    kill_after: Duration,
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
            sigchld,
            command: None,
            kill_after,
        })
    }

    fn run(&mut self, command: &[OsString], lock: Option<OwnedFd>) -> ExitCode {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            // Without it, what COMMAND leaves would go to init, unguarded: fail closed.
            self.tell(&format!("error cannot become a child subreaper: {e}"));
            return ExitCode::from(EXIT_INTERNAL);
        }
        // The wrapper may have died since it started us: then COMMAND must not start at all.
        if self.wrapper_gone() {
            return ExitCode::from(EXIT_INTERNAL);
        }
        match crate::run::spawn_guarded(command, lock.as_ref().map(AsFd::as_fd)) {
            Ok(child) => {
                let pid = Pid::from_raw(child.id() as i32);
                self.command = pid;
                self.tell(&format!("started {}", child.id()));
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                self.tell(&format!("failed {errno} {e}"));
                return ExitCode::from(EXIT_INTERNAL);
            }
        }
        // Held until the last descendant is gone: this is the point of the keeper.
        let _lock = lock;
        loop {
            if self.reap() {
                self.tell("gone");
                return ExitCode::SUCCESS;
            }
            let Some(control) = &self.control else {
                self.stop_everything();
                return ExitCode::SUCCESS;
            };
            let mut fds = [
                rustix::event::PollFd::new(control, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&self.sigchld, rustix::event::PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    let _ = writeln!(io::stderr(), "unique-instance: keeper: poll: {e}");
                    // Nothing left to wait with: treat it as the wrapper's loss, which stops
                    // the tree and waits for it with the simplest means.
                    self.control = None;
                    continue;
                }
            }
            self.drain_sigchld();
            self.read_control();
        }
    }

    /// Reaps every child that has ended, telling the wrapper; true when no child is left.
    fn reap(&mut self) -> bool {
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if Some(pid) == self.command {
                        self.command = None;
                        self.tell(&format!("exited {}", status.as_raw()));
                    } else {
                        self.tell(&format!("reaped {}", pid.as_raw_nonzero()));
                    }
                }
                Ok(None) => return false,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::CHILD) => return true,
                Err(e) => {
                    let _ = writeln!(io::stderr(), "unique-instance: keeper: wait: {e}");
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

    /// Reads what the wrapper sent and does it; at end of file, notes that the wrapper is gone.
    fn read_control(&mut self) {
        let Some(control) = &self.control else {
            return;
        };
        let mut buf = [0u8; 512];
        loop {
            match (&*control).read(&mut buf) {
                Ok(0) => {
                    self.control = None;
                    break;
                }
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.control = None;
                    break;
                }
            }
        }
        while let Some(end) = self.inbox.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbox.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            self.obey(line.trim_end());
        }
    }

    /// Carries out one order of the wrapper.
    fn obey(&mut self, line: &str) {
        let mut words = line.split(' ');
        let order = (
            words.next(),
            words.next().and_then(|p| p.parse::<i32>().ok()),
            words.next().and_then(|s| s.parse::<i32>().ok()),
        );
        let (Some("kill"), Some(pid), Some(signal)) = order else {
            tracing::debug!(line, "keeper: an order it does not know; ignored");
            return;
        };
        let (Some(pid), Some(signal)) = (Pid::from_raw(pid), Signal::from_named_raw(signal)) else {
            return;
        };
        // Only our own child, not reaped yet: its PID cannot have been reused.
        let ours = Some(pid) == self.command
            || children_in(Path::new("/proc"), rustix::process::getpid()).contains(&pid);
        if !ours {
            tracing::debug!(
                ?pid,
                "keeper: not a child of ours (any more); not signalled"
            );
            return;
        }
        if let Err(e) = rustix::process::kill_process(pid, signal) {
            tracing::debug!(?pid, error = %e, "keeper: cannot signal");
        }
    }

    /// Sends one line to the wrapper, if it is still there.
    fn tell(&mut self, line: &str) {
        let Some(control) = &self.control else {
            return;
        };
        let mut message = Vec::with_capacity(line.len() + 1);
        message.extend_from_slice(line.as_bytes());
        message.push(b'\n');
        let mut rest = &message[..];
        while !rest.is_empty() {
            match (&*control).write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The wrapper reads all the time; wait until it has room.
                    let mut fds = [rustix::event::PollFd::new(
                        control,
                        rustix::event::PollFlags::OUT,
                    )];
                    let _ = rustix::event::poll(&mut fds, None);
                }
                // Gone: it will never read it.
                Err(_) => return,
            }
        }
    }

    /// The wrapper is gone: stops COMMAND and every descendant (SIGTERM, then SIGKILL after
    /// `--kill-after`), and returns once none is left.
    fn stop_everything(&mut self) {
        let _ = writeln!(
            io::stderr(),
            "unique-instance: the wrapper is gone; stopping COMMAND and everything it started \
             (SIGTERM now, SIGKILL in {:?})",
            self.kill_after
        );
        let deadline = Instant::now().checked_add(self.kill_after);
        let mut signal = Signal::TERM;
        let mut signalled = std::collections::HashSet::new();
        let me = rustix::process::getpid();
        loop {
            if self.reap() {
                return;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                signal = Signal::KILL;
            }
            for (pid, parent) in descendants(Path::new("/proc"), me) {
                // One not signalled now (it changed parents since the walk) is found again.
                if !signalled.contains(&(pid, signal.as_raw()))
                    && signal_descendant(pid, parent, me, signal)
                {
                    signalled.insert((pid, signal.as_raw()));
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
            let mut fds = [rustix::event::PollFd::new(
                &self.sigchld,
                rustix::event::PollFlags::IN,
            )];
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
            self.drain_sigchld();
        }
    }
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
    if parent == me {
        let _ = rustix::process::kill_process(pid, signal);
        return true;
    }
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()));
            let now = stat.ok().as_deref().and_then(parent_in_stat);
            if now == Some(parent.as_raw_nonzero().get()) || now == Some(me.as_raw_nonzero().get())
            {
                let _ = rustix::process::pidfd_send_signal(&pidfd, signal);
                return true;
            }
            // Exited (not even a zombie any more) counts as done; another parent is looked at
            // again on the next walk.
            now.is_none()
        }
        // A kernel without pidfds (before 5.3): the plain signal.
        Err(rustix::io::Errno::NOSYS) => {
            let _ = rustix::process::kill_process(pid, signal);
            true
        }
        // Gone already.
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------------
// The wrapper's side

/// Why COMMAND could not be started.
pub(crate) enum StartError {
    /// COMMAND itself could not be executed.
    Command(io::Error),
    /// The keeper could not be started, or could not do its job.
    Keeper(String),
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
    closed: bool,
}

/// Starts the keeper, which starts COMMAND; returns once COMMAND runs, with its PID.
#[allow(unsafe_code)]
pub(crate) async fn start(
    command: &[OsString],
    notify: bool,
    lock: Option<BorrowedFd<'_>>,
    kill_after: Duration,
) -> Result<(Handle, Pid), StartError> {
    let keeper_error = |what: &str, e: io::Error| StartError::Keeper(format!("{what}: {e}"));
    let (ours, theirs) = UnixStream::pair().map_err(|e| keeper_error("socketpair", e))?;
    ours.set_nonblocking(true)
        .map_err(|e| keeper_error("socket", e))?;
    let control = tokio::net::UnixStream::from_std(ours).map_err(|e| keeper_error("socket", e))?;
    // Close-on-exec in this process; the keeper's copy is made inheritable in its child only.
    let lock_dup = lock
        .map(duplicate_high)
        .transpose()
        .map_err(|e| keeper_error("duplicating the lock's descriptor", e))?;
    let lock_raw = lock_dup.as_ref().map(AsRawFd::as_raw_fd);
    let theirs_raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("unique-instance")
        .arg(SUBCOMMAND)
        .arg("--control-fd")
        .arg(theirs_raw.to_string())
        .arg("--kill-after")
        .arg(kill_after.as_secs_f64().to_string());
    if let Some(fd) = lock_raw {
        cmd.arg("--lock-fd").arg(fd.to_string());
    }
    cmd.arg("--").args(command);
    if notify {
        // Only COMMAND's environment (the keeper passes its own on): ours is left alone.
        cmd.env_remove("NOTIFY_SOCKET");
    }
    // Ours may come from an outer `run`: the keeper sets COMMAND's.
    cmd.env_remove(LOCK_FD_ENV);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed: it makes raw system calls (sigaction, fcntl), allocates nothing and
    // takes no locks. `theirs_raw` and `lock_raw` name `theirs` and `lock_dup`, which this process
    // keeps open until `spawn` has returned.
    unsafe {
        cmd.pre_exec(move || {
            // Ignored across exec: the keeper never dies of a signal meant for COMMAND, not even
            // one that comes before it could set anything up. No PR_SET_PDEATHSIG: the keeper
            // must outlive us, to stop what COMMAND started if we are killed.
            for signal in FORWARDED {
                let signal = nix::sys::signal::Signal::try_from(signal)?;
                nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn)?;
            }
            for fd in std::iter::once(theirs_raw).chain(lock_raw) {
                rustix::io::fcntl_setfd(BorrowedFd::borrow_raw(fd), rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
    let process = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| keeper_error("cannot execute /proc/self/exe", e))?;
    drop(theirs);
    drop(lock_dup);
    let pid = process
        .id()
        .and_then(|id| Pid::from_raw(id as i32))
        .ok_or_else(|| StartError::Keeper("it has no process id".into()))?;
    let mut handle = Handle {
        process,
        pid,
        control,
        inbox: Vec::new(),
        closed: false,
    };
    let first = handle.next_line().await;
    let started = first
        .as_deref()
        .and_then(|l| l.strip_prefix("started "))
        .and_then(|p| p.parse().ok())
        .and_then(Pid::from_raw);
    if let Some(command_pid) = started {
        return Ok((handle, command_pid));
    }
    // It ends after any other first word: wait for that, so that it no longer holds the lock.
    let status = handle.finish().await;
    Err(match first.as_deref().map(|l| l.split_once(' ')) {
        Some(Some(("failed", rest))) => {
            let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
            match errno.parse::<i32>() {
                Ok(errno) if errno > 0 => StartError::Command(io::Error::from_raw_os_error(errno)),
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

impl Handle {
    /// The next event; [`Event::Gone`] too when the keeper ended without saying so.
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

    /// The next whole line from the keeper, `None` at end of file. Cancel-safe: what was read
    /// stays in the inbox.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.inbox.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.inbox.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            if self.closed {
                return None;
            }
            if let Err(e) = self.control.readable().await {
                tracing::debug!(error = %e, "the keeper's socket");
                self.closed = true;
                continue;
            }
            let mut buf = [0u8; 512];
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
    /// process COMMAND left behind).
    pub(crate) async fn signal(&mut self, pid: Pid, signal: Signal) {
        let line = format!("kill {} {}\n", pid.as_raw_nonzero(), signal.as_raw());
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            if let Err(e) = self.control.writable().await {
                tracing::debug!(error = %e, "cannot tell the keeper to signal");
                return;
            }
            match self.control.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // Gone: its end of file says so to the caller.
                    tracing::debug!(error = %e, "cannot tell the keeper to signal");
                    return;
                }
            }
        }
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
