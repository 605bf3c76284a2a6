//! Waiting for a holder to let go: an inotify watch on the lock directory and on the file, and
//! the check that the lock may be free now.
//! Must not: block in `F_OFD_SETLKW` (nothing could cancel it); every wait can be dropped.

use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

use crate::plan::LockPlan;

use super::dir::LockDir;
use super::ofd::is_held;
use super::watch::{drain, new_inotify};

/// An inotify instance (non-blocking, close-on-exec) for a copy waiting for the lock file of
/// `lock_dir`: readable when an entry of the directory is created, removed or renamed, or the
/// directory itself goes. [`may_be_free`] adds the file itself before each check.
///
/// A lock wait built on it can be abandoned at any moment (dropping the descriptor ends it),
/// unlike a thread blocked in `F_OFD_SETLKW`, which nothing can cancel and which would take the
/// lock long after its waiter gave up.
pub(crate) fn release_watch(lock_dir: &LockDir) -> std::io::Result<ReleaseWatch> {
    use rustix::fs::inotify::{self, WatchFlags};
    let fd = new_inotify()?;
    let dir = format!("/proc/self/fd/{}", lock_dir.fd.as_raw_fd());
    let wd = inotify::add_watch(
        &fd,
        dir.as_str(),
        WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR,
    )?;
    Ok(ReleaseWatch {
        fd,
        watches: vec![wd],
    })
}

/// A [`release_watch`]: the inotify instance and its watches.
#[derive(Debug)]
pub(crate) struct ReleaseWatch {
    fd: OwnedFd,
    watches: Vec<i32>,
}

impl AsRawFd for ReleaseWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl ReleaseWatch {
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The instance with its watches removed, to be kept rather than closed: closing an inotify
    /// instance waits for an RCU grace period (about 15 ms measured, benchmark 4), which a copy
    /// that has just taken the lock over should not spend before it starts. Kept by the guard,
    /// it is closed after the lock is released.
    pub(crate) fn into_quiet(self) -> OwnedFd {
        for wd in &self.watches {
            // Removing a watch defers the freeing work, unlike closing the instance.
            let _ = rustix::fs::inotify::remove_watch(&self.fd, *wd);
        }
        drain(&self.fd);
        self.fd
    }
}

/// Could the lock file of `plan` be taken now? Arms `watch` (a [`release_watch`]) on the file
/// the path names first, so that a release after this check wakes the waiter: an OFD lock is
/// released when the last descriptor of its open file description closes, which inotify reports
/// as `IN_CLOSE_WRITE` (the holder exiting, even killed, or a holder that removed the file,
/// which the directory watch reports). Tested with `F_OFD_GETLK` on a descriptor opened only for
/// reading, whose close wakes nobody; any doubt (no file, an error, a lock directory removed
/// or replaced) says "try": the attempt itself then decides, and reports what is wrong. Not
/// every release sends an event (see `RECHECK_EVERY` in options.rs): waiters also call this
/// periodically.
pub(crate) fn may_be_free(watch: &mut ReleaseWatch, plan: &LockPlan, lock_dir: &LockDir) -> bool {
    use rustix::fs::inotify::{self, WatchFlags};
    // Removed or replaced, the directory's file is no longer the one to wait for: try, and the
    // attempt opens (makes) the directory the path leads to now.
    if !lock_dir.is_current() {
        return true;
    }
    let Ok(file) = rustix::fs::openat(
        &*lock_dir.fd,
        plan.file_name.as_os_str(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) else {
        return true;
    };
    // Through the descriptor, so the watch is on the very file tested below.
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match inotify::add_watch(&watch.fd, path.as_str(), WatchFlags::CLOSE_WRITE) {
        Ok(wd) if !watch.watches.contains(&wd) => watch.watches.push(wd),
        Ok(_) => {}
        Err(_) => return true,
    }
    !matches!(is_held(&file), Ok(true))
}
