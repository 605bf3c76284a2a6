//! The wrapper's side of the keeper: starting it (`spawn`), handing it what holds the instance
//! (`go`), and the handle through which the wrapper orders and hears from it.
//!
//! Over 400 lines, by a little: starting the keeper (its command line, its descriptors, what it
//! must not inherit) and the one writer of the wrapper's side of the protocol.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::SUBCOMMAND;
use crate::cli::InstanceArgs;
use crate::run::{FORWARDED, LOCK_FD_ENV, children_in, signal_bit};

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
            // As our caller left it: the keeper ignores it as we do, and gives COMMAND the same.
            crate::restore_file_size_signal()?;
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

    /// Has the keeper send `signal` (SIGTERM, with SIGCONT, or SIGKILL) to COMMAND and every
    /// other descendant of its at once (`tree SIGNAL`): the instance was lost, and the whole
    /// tree must be gone within one `--kill-after` of the loss. Queued and sent as
    /// [`Handle::signal`]'s orders are.
    pub(crate) fn signal_tree(&mut self, signal: Signal) {
        if self.closed {
            return;
        }
        let line = format!("tree {}\n", signal.as_raw());
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
