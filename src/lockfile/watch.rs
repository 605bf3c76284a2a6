//! The watch of a held lock: what changed under it (`PathChange`), the inotify set-up on its
//! directory, the symlinks and the directories above, and the re-verification that it still
//! excludes other copies.
//! Must not: report a loss or re-create the file itself (see `recover.rs` and `watcher.rs`).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::held::Shared;
use super::ofd::is_held;
use super::walk::MAX_SYMLINKS;

/// What changed under a held lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathChange {
    Removed,
    Replaced,
}

pub(super) fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// A new inotify instance, for [`WatchHandle::add_watches`]. Made before the lock and the bus
/// connection are opened, so that their descriptors are numbered above it: see
/// [`HeldLock::move_above`](super::held::HeldLock::move_above) for why that order matters.
pub(crate) fn new_inotify() -> std::io::Result<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags};
    Ok(inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?)
}

/// Identifies a held lock file's path and inode, for re-checks from another task.
#[derive(Debug, Clone)]
pub(crate) struct WatchHandle {
    pub(super) dir: Arc<OwnedFd>,
    pub(super) file_name: OsString,
    pub(super) path: PathBuf,
    pub(super) shared: Arc<Shared>,
}

impl WatchHandle {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `fd` (a [`new_inotify`] instance) readable whenever an entry of the lock directory
    /// is removed, renamed or created, or the directory itself goes: every way the path can stop
    /// naming our file.
    ///
    /// Called by the watch itself (its task or thread), not on the acquisition's path: it costs
    /// a system call per directory above the lock file and one per component of the path, and
    /// the watch checks the path once its watches are in place anyway, so a change made before
    /// then is not missed (see `watch_lock`).
    pub(crate) fn add_watches(&self, fd: &OwnedFd) -> std::io::Result<()> {
        use rustix::fs::inotify::{self, WatchFlags};
        let flags = WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR;
        // Through our directory descriptor, not its path: the path may have been replaced.
        let dir = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        inotify::add_watch(fd, dir.as_str(), flags)?;
        // And every directory holding a symlink on the way, so that a flipped
        // `current -> releases/vN` wakes us too (its path then leads to another file).
        for parent in symlink_parents(&self.path) {
            inotify::add_watch(fd, parent.as_path(), flags)?;
        }
        // And every directory above ours, for itself only: renaming or removing any of them
        // (`mv app app.old && mv app.new app`, the usual deploy) leads the path elsewhere
        // without touching our directory. Self events come only when that directory itself
        // moves or goes, so they cost an idle holder nothing. `MASK_ADD`: a directory already
        // watched above keeps its events too.
        let above = self
            .path
            .parent()
            .into_iter()
            .flat_map(Path::ancestors)
            .skip(1);
        for ancestor in above.filter(|a| a.parent().is_some()) {
            // Best effort, like the symlink parents: the re-check decides.
            let _ = inotify::add_watch(
                fd,
                ancestor,
                WatchFlags::MOVE_SELF
                    | WatchFlags::DELETE_SELF
                    | WatchFlags::ONLYDIR
                    | WatchFlags::MASK_ADD,
            );
        }
        Ok(())
    }

    /// Is the path still our file? `None` when it is. Asked twice: of the name in the directory
    /// we opened, and of the whole path as given, re-resolved (its symlinks followed as they are
    /// now): a retargeted symlink on the way leads other copies to another file.
    pub(crate) fn check_path(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.path_as(dev, ino)
    }

    /// Does the name in the directory we opened still name our file? `None` when it does.
    pub(super) fn check_in_dir(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.in_dir_as(dev, ino)
    }

    /// The (dev, ino) of the file the lock is on now.
    fn identity(&self) -> (u64, u64) {
        let now = self.shared.now();
        (now.dev, now.ino)
    }

    /// [`WatchHandle::check_path`] for the file (dev, ino).
    pub(super) fn path_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        self.in_dir_as(dev, ino)
            .or_else(|| ours(rustix::fs::lstat(&self.path), dev, ino))
    }

    /// [`WatchHandle::check_in_dir`] for the file (dev, ino).
    pub(super) fn in_dir_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        ours(
            rustix::fs::statat(
                &*self.dir,
                self.file_name.as_os_str(),
                AtFlags::SYMLINK_NOFOLLOW,
            ),
            dev,
            ino,
        )
    }
}

/// Is `st` (of the path, or an error getting it) the file (dev, ino)? `None` when it is.
fn ours(st: rustix::io::Result<Stat>, dev: u64, ino: u64) -> Option<PathChange> {
    match st {
        Ok(st) if st.st_dev == dev && st.st_ino == ino => None,
        Ok(_) => Some(PathChange::Replaced),
        Err(Errno::NOENT | Errno::NOTDIR) => Some(PathChange::Removed),
        // Cannot tell (e.g. EACCES after a permission change): not evidence of a loss.
        Err(_) => None,
    }
}

/// The directories that hold a symlink on the way to `path`'s directory, as the path is
/// resolved now (a symlink's target may hold more). Best effort: it only adds wake-ups, and
/// [`WatchHandle::check_path`] decides.
fn symlink_parents(path: &Path) -> Vec<PathBuf> {
    let mut parents = Vec::new();
    let mut pending: Vec<PathBuf> = path.parent().map(Path::to_owned).into_iter().collect();
    let mut links = 0;
    while let Some(dir) = pending.pop() {
        let mut prefix = PathBuf::new();
        for component in dir.components() {
            prefix.push(component);
            let Ok(target) = std::fs::read_link(&prefix) else {
                continue;
            };
            links += 1;
            if links > MAX_SYMLINKS {
                return parents;
            }
            let parent = prefix.parent().unwrap_or(Path::new("/")).to_owned();
            // The rest of the path goes on from where the link points.
            let rest: PathBuf = dir.components().skip(prefix.components().count()).collect();
            pending.push(parent.join(target).join(rest));
            parents.push(parent);
            break;
        }
    }
    parents
}

// What a loss report needs beyond `check_path`: whether our lock is still what the kernel sees.
impl WatchHandle {
    /// Re-verifies, right now, that the lock still excludes other copies: the path (from our
    /// directory, and resolved afresh) names our file, and a fresh open of it shows it locked
    /// (`F_OFD_GETLK` on a new open file description sees our lock as a conflicting one) with
    /// the same (dev, ino). Anything that cannot be checked counts as not verified.
    pub(crate) fn verify_held(&self) -> bool {
        let (dev, ino) = self.identity();
        self.verify_held_as(dev, ino)
    }

    /// [`WatchHandle::verify_held`] for the file (dev, ino).
    pub(super) fn verify_held_as(&self, dev: u64, ino: u64) -> bool {
        if self.path_as(dev, ino).is_some() {
            return false;
        }
        let file = if self.path.is_absolute() {
            rustix::fs::open(&self.path, probe_flags(), Mode::empty())
        } else {
            rustix::fs::openat(
                &*self.dir,
                self.file_name.as_os_str(),
                probe_flags(),
                Mode::empty(),
            )
        };
        let Ok(file) = file else { return false };
        let same = rustix::fs::fstat(&file).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino);
        same && is_held(&file).unwrap_or(false)
    }
}

/// Opening a lock file only to look at it: never following a symlink, never blocking on a FIFO,
/// never becoming a controlling terminal.
fn probe_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK
}
