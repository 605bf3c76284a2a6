//! Once the wrapper is gone: COMMAND and everything it started are stopped (SIGTERM, SIGKILL
//! after `--kill-after`, or SIGKILL at once when nothing holds the instance any more), and the
//! keeper returns once none is left.

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use unique_instance::HandedLockFile;

use super::Keeper;
use super::kept::bus_still_connected;
use crate::keeper::RESCAN;
use crate::run::{children_in, parent_in_stat};

impl Keeper {
    /// The wrapper is gone: stops COMMAND and every descendant, and returns once none is left.
    /// While the keeper holds the instance (the lock file, or the bus connection that owns the
    /// name), nothing excludes a new copy but the keeper itself, and it exits only once
    /// the last descendant is gone: they get SIGTERM (and SIGCONT, so that a stopped one acts on
    /// it), and SIGKILL after `--kill-after`. Holding nothing (`--backend dbus` on a bus whose
    /// socket could not be handed over, or once the bus closed that connection: the name is
    /// free), nothing excludes a new copy any more: SIGKILL at once, as `PR_SET_PDEATHSIG` did
    /// before there was a keeper.
    pub(super) fn stop_everything(&mut self) {
        // Before anything is said: the file may have been removed already.
        let had_lock = self.kept.is_some() || self.unkept.is_some();
        self.check_kept();
        let mut holding =
            self.lock.is_some() || self.kept.is_some() || bus_still_connected(&mut self.bus);
        let (mut deadline, mut signal) = if holding {
            let term = if self.tree_got_term && self.tree_kill_at.is_none() {
                "already sent SIGTERM by the service manager"
            } else if self.tree_kill_at.is_some() {
                // `tree 15`: every process then got it; none gets a second one.
                "already sent SIGTERM by the wrapper for the loss"
            } else if !self.sent_term.is_empty() {
                "SIGTERM now to what was not sent it already"
            } else {
                "SIGTERM now"
            };
            // No later than the wrapper, having lost the instance, would have killed the tree.
            let now = Instant::now();
            let kill_at = match (now.checked_add(self.kill_after), self.tree_kill_at) {
                (Some(ours), Some(wrappers)) => Some(ours.min(wrappers)),
                (ours, wrappers) => ours.or(wrappers),
            };
            let kill_in = kill_at.map_or(self.kill_after, |at| at.saturating_duration_since(now));
            say!(
                "unique-instance: the wrapper is gone; its keeper (pid {}) holds the instance \
                 while it stops COMMAND and everything it started ({term}, SIGKILL in {:?})",
                std::process::id(),
                kill_in
            );
            (kill_at, Signal::TERM)
        } else {
            (Some(Instant::now()), Signal::KILL)
        };
        if !holding {
            nothing_held(if had_lock { LOCK_LOST } else { NO_BUS });
        }
        let mut signalled = std::collections::HashSet::new();
        // What was there when the wrapper went: the tree to stop. A process born since to one
        // of them that got SIGTERM is its clean-up (a trap's `sleep`, `rsync`, `pg_ctl`), which
        // SIGTERM would cut short (a review: every clean-up child was killed so); it gets
        // SIGKILL at the deadline with the rest, as the wrapper's own stop does. Orphans given
        // to the keeper (a subreaper) are looked at as they come.
        let mut tree: Option<std::collections::HashSet<Pid>> = None;
        let me = rustix::process::getpid();
        loop {
            if self.reap() {
                self.release_kept();
                return;
            }
            if holding
                && self.lock.is_none()
                && self.kept.is_none()
                && !bus_still_connected(&mut self.bus)
            {
                holding = false;
                deadline = Some(Instant::now());
                nothing_held(if had_lock { LOCK_LOST } else { NO_BUS });
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                signal = Signal::KILL;
            }
            let found = descendants(Path::new("/proc"), me);
            let tree = tree.get_or_insert_with(|| found.iter().map(|&(pid, _)| pid).collect());
            for (pid, parent) in found {
                if signal == Signal::TERM && parent != me && !tree.contains(&pid) {
                    continue;
                }
                let now = self.signal_for(pid, signal);
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

impl Keeper {
    /// What `pid` gets when the tree is sent `signal`: a process sent SIGTERM already (by the
    /// wrapper, or the service manager to the whole tree) is only continued, so that a stopped
    /// one acts on it, and never sent a second SIGTERM.
    fn signal_for(&self, pid: Pid, signal: Signal) -> Signal {
        if signal == Signal::TERM && (self.tree_got_term || self.sent_term.contains(&pid)) {
            Signal::CONT
        } else {
            signal
        }
    }

    /// `tree SIGNAL`: the wrapper lost the instance, and COMMAND and every other descendant get
    /// `signal` at once, SIGTERM (with SIGCONT, so that a stopped one acts on it; only SIGCONT
    /// for one sent SIGTERM already) or SIGKILL. One born after the walk is not signalled here:
    /// the wrapper's SIGKILL (a walk of its own) or the stop of what COMMAND left finds it.
    pub(super) fn signal_tree(&mut self, signal: Signal) {
        let me = rustix::process::getpid();
        for (pid, parent) in descendants(Path::new("/proc"), me) {
            signal_descendant(pid, parent, me, self.signal_for(pid, signal));
        }
        if signal == Signal::TERM {
            self.tree_got_term = true;
            if self.tree_kill_at.is_none() {
                self.tree_kill_at = Instant::now().checked_add(self.kill_after);
            }
        }
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
