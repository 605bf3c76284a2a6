//! The keeper process: what it holds, its loop while the wrapper lives (COMMAND started, the
//! wrapper's orders carried out, children reaped and reported), and what follows the wrapper's
//! end: the lock file kept (`kept.rs`) and the tree stopped (`stop.rs`).
//!
//! Over 400 lines: the keeper's state, one struct whose every field the loop below reads, and
//! the loop itself (the control socket read and written without blocking, children reaped),
//! read best together.

mod kept;
mod stop;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use unique_instance::HandedLockFile;

use super::orders::{Held, MAX_ORDER, Order, check_lock, parse_order};
use crate::run::children_in;
use crate::{EXIT_INTERNAL, ExitCode};

pub(super) struct Keeper {
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
    pub(super) options: Option<unique_instance::InstanceOptions>,
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
    /// The service manager sent SIGTERM to the whole tree (`delivered 15`), or we did (`tree
    /// 15`): nobody is sent it again.
    tree_got_term: bool,
    /// When the whole tree is to get SIGKILL, the wrapper having lost the instance (`tree 15`,
    /// plus `--kill-after`): kept if the wrapper goes before, so that the tree is not given a
    /// second grace.
    tree_kill_at: Option<std::time::Instant>,
}

impl Keeper {
    pub(super) fn new(control: UnixStream, kill_after: Duration) -> io::Result<Self> {
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
            tree_kill_at: None,
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

    pub(super) fn run(
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
            Order::Tree { signal } => {
                self.signal_tree(signal);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::testing::send;
    use std::os::fd::BorrowedFd;
    use unique_instance::HandedLockState;

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
}
