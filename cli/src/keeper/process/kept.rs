//! Once the wrapper is gone: the keeper keeps the lock file as the wrapper did (named in the
//! record, watched, re-created when removed), or lets it go and says so.

use std::os::fd::{AsFd, OwnedFd};

use unique_instance::{HandedLockFile, HandedLockState};

use super::Keeper;
use crate::keeper::RESCAN;

impl Keeper {
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
    pub(super) fn keep_lock_file(&mut self) {
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
    pub(super) fn check_kept(&mut self) {
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
}

impl Keeper {
    /// The last of COMMAND's tree is gone: the instance is given up as the wrapper's release
    /// would have, the bus name first (the socket closed: the bus drops the name), then the
    /// lock file kept since the wrapper left, removed. Left behind, root's file in the shared
    /// directory kept out every other user's copy (77: theirs to take over, but not to write)
    /// until root ran the instance again (a review).
    pub(super) fn release_kept(&mut self) {
        self.bus = None;
        if let Some(kept) = self.kept.take()
            && let Err(e) = kept.release()
        {
            say!("unique-instance: keeper: {e}");
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

/// Does the bus connection whose socket the keeper holds still exist? The bus closes it when it
/// drops the connection (it exited, or dropped us); the name is then free, and the duplicate
/// is let go. Only the socket's state is looked at: nothing is ever read from it.
pub(super) fn bus_still_connected(bus: &mut Option<OwnedFd>) -> bool {
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
