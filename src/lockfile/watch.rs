//! The watch of a held lock: what changed under it (`PathChange`), the inotify set-up on its
//! directory, the symlinks and every directory the path goes through (`way_to`), and the
//! re-verification that it still excludes other copies.
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
    /// The path cannot be followed any more (`EACCES`, `ELOOP`...): it cannot be confirmed to
    /// lead to our file.
    Unreachable,
}

/// What a batch of inotify events said of our file's name in our directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct NameEvents {
    /// Files made at the name (`IN_CREATE`, `IN_MOVED_TO`), by anyone: our own re-creations
    /// included.
    pub(super) created: u64,
    /// The kernel's queue overflowed (`IN_Q_OVERFLOW`): events were lost.
    pub(super) overflowed: bool,
}

/// Reads every pending event of `fd` (a non-blocking inotify instance), counting those that
/// made a file named `name` in the directory watched as `dir_watch`.
pub(super) fn read_name_events(fd: &OwnedFd, dir_watch: i32, name: &std::ffi::OsStr) -> NameEvents {
    use std::os::unix::ffi::OsStrExt;
    const IN_MOVED_TO: u32 = 0x80;
    const IN_CREATE: u32 = 0x100;
    const IN_Q_OVERFLOW: u32 = 0x4000;
    // struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len] (NUL-padded).
    const HEADER: usize = 16;
    let mut seen = NameEvents::default();
    let mut buf = [0u8; 4096];
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at + HEADER <= n {
            let field = |i: usize| {
                let b = &buf[at + i * 4..at + i * 4 + 4];
                [b[0], b[1], b[2], b[3]]
            };
            let wd = i32::from_ne_bytes(field(0));
            let mask = u32::from_ne_bytes(field(1));
            let len = u32::from_ne_bytes(field(3)) as usize;
            let end = (at + HEADER).saturating_add(len).min(n);
            let raw = &buf[at + HEADER..end];
            let event_name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            if mask & IN_Q_OVERFLOW != 0 {
                seen.overflowed = true;
            } else if wd == dir_watch
                && mask & (IN_CREATE | IN_MOVED_TO) != 0
                && event_name == name.as_bytes()
            {
                seen.created += 1;
            }
            at = end;
        }
    }
    seen
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
    /// is removed, renamed or created, or the directory itself goes; whenever a directory the
    /// path goes through is renamed or removed (see [`way_to`]: the ancestors of the path as
    /// given, and, through each symlink, the directories above its target); and whenever an
    /// entry of a directory holding a symlink on the way changes (a flipped
    /// `current -> releases/vN`): every way the path can stop naming our file without a mount.
    ///
    /// Called by the watch itself (its task or thread), not on the acquisition's path: it costs
    /// a system call per component of the path (symlinks' targets included) and one per
    /// directory it goes through, and the watch checks the path once its watches are in place
    /// anyway, so a change made before then is not missed (see `watch_lock`). Called again
    /// after each wake-up ([`WatchHandle::rewatch`]), since the path may go through other
    /// directories by then.
    pub(crate) fn add_watches(&self, fd: &OwnedFd) -> std::io::Result<i32> {
        use rustix::fs::inotify::{self, WatchFlags};
        // `MASK_ADD` throughout: a directory watched twice (the lock directory as one the path
        // goes through, or on a second call) keeps every event it was given.
        let entries = WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR
            | WatchFlags::MASK_ADD;
        // Through our directory descriptor, not its path: the path may have been replaced.
        let dir = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        let dir_watch = inotify::add_watch(fd, dir.as_str(), entries)?;
        let way = self.path.parent().map(way_to).unwrap_or_default();
        // Every directory holding a symlink on the way, so that a flipped link wakes us too
        // (its path then leads to another file).
        for parent in &way.link_dirs {
            inotify::add_watch(fd, parent.as_path(), entries)?;
        }
        // And every directory the path goes through, for itself only: renaming or removing any
        // of them (`mv app app.old && mv app.new app`, the usual deploy, or the same above a
        // symlink's target) leads the path elsewhere without touching our directory. Self
        // events come only when that directory itself moves or goes, so they cost an idle
        // holder nothing.
        for dir in &way.entered {
            // Best effort (one we may not read cannot be watched): the re-check decides.
            let _ = inotify::add_watch(
                fd,
                dir.as_path(),
                WatchFlags::MOVE_SELF
                    | WatchFlags::DELETE_SELF
                    | WatchFlags::ONLYDIR
                    | WatchFlags::MASK_ADD,
            );
        }
        Ok(dir_watch)
    }

    /// [`WatchHandle::add_watches`] again, after a wake-up, before the path is checked: when the
    /// path still leads to our file, it may go through other directories by now (a directory
    /// renamed and a link pointed at its new name), which must wake us in turn. Watches already
    /// there stay as they are; those of directories the path has left only wake us in vain.
    /// Best effort: the check decides.
    pub(crate) fn rewatch(&self, fd: &OwnedFd) {
        let _ = self.add_watches(fd);
    }

    /// How many times the holder re-created its lock file so far.
    pub(super) fn recreated(&self) -> u64 {
        self.shared.now().recreated
    }

    /// The file's name in its directory.
    pub(super) fn file_name(&self) -> &std::ffi::OsStr {
        &self.file_name
    }

    /// Is the path still our file? `None` when it is. Asked twice: of the name in the directory
    /// we opened, and of the whole path as given, re-resolved (its symlinks followed as they are
    /// now): a retargeted symlink on the way leads other copies to another file.
    pub(crate) fn check_path(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.path_as(dev, ino)
    }

    /// The (dev, ino) of the file the lock is on now.
    pub(super) fn identity(&self) -> (u64, u64) {
        let now = self.shared.now();
        (now.dev, now.ino)
    }

    /// [`WatchHandle::check_path`] for the file (dev, ino).
    pub(super) fn path_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        self.in_dir_as(dev, ino)
            .or_else(|| ours(rustix::fs::lstat(&self.path), dev, ino))
    }

    /// Does the name in the directory we opened still name the file (dev, ino)? `None` when it
    /// does.
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
        // The path can no longer be followed to any file (`EACCES`: a directory on the way
        // replaced by one we may not enter, e.g. through `RENAME_EXCHANGE`; `ELOOP`): that it
        // leads to ours can no longer be confirmed, while a copy that can follow it (root)
        // would lock another file. Not "still ours".
        Err(_) => Some(PathChange::Unreachable),
    }
}

/// The directories a lock directory's path goes through as it resolves now (see [`way_to`]).
#[derive(Debug, Default, PartialEq, Eq)]
struct Way {
    /// Every directory the resolution enters, `/` aside (it can be neither renamed nor
    /// removed): the ancestors of the path as given and, through each symlink, the directories
    /// above its target, down to the lock directory itself.
    entered: Vec<PathBuf>,
    /// The directories that hold a symlink on the way.
    link_dirs: Vec<PathBuf>,
}

/// Resolves `dir` one component at a time from `/`, as the kernel does (a symlink's target
/// takes its place, `..` goes up from where the resolution is), noting the directories it goes
/// through: renaming or removing any of them, or changing an entry of one that holds a symlink,
/// can make the path lead elsewhere. Best effort and unchecked, as it only adds wake-ups: it stops where the path leads nowhere, and [`WatchHandle::check_path`] decides.
fn way_to(dir: &Path) -> Way {
    use std::collections::VecDeque;
    let mut way = Way::default();
    let mut resolved = PathBuf::from("/");
    let mut pending: VecDeque<OsString> = names(dir).into();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        match std::fs::read_link(&here) {
            Ok(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    break;
                }
                way.link_dirs.push(resolved.clone());
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                // The rest of the path goes on from where the link points.
                for part in names(&target).into_iter().rev() {
                    pending.push_front(part);
                }
            }
            // Not a symlink: entered.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                way.entered.push(here.clone());
                resolved = here;
            }
            // Missing, or not ours to look at: the path leads nowhere from here.
            Err(_) => break,
        }
    }
    way
}

/// The names `path` is made of, `..` included, as a resolution takes them.
fn names(path: &Path) -> Vec<OsString> {
    use std::path::Component;
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// `srv/current -> ../data/rel/v1` (relative, through `..`) and `data/rel -> /abs/rel`
    /// (absolute): every directory entered is listed, those above each target included, and
    /// so is every directory holding a link.
    #[test]
    fn the_way_includes_the_directories_above_each_symlink_target() {
        let base = tempfile::tempdir().expect("tempdir");
        // Resolved, so that the expected paths hold no symlink of the machine's own.
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        std::fs::create_dir_all(b.join("abs/rel/v1/run")).expect("mkdir");
        std::fs::create_dir_all(b.join("data")).expect("mkdir");
        std::fs::create_dir_all(b.join("srv")).expect("mkdir");
        std::os::unix::fs::symlink(b.join("abs/rel"), b.join("data/rel")).expect("symlink");
        std::os::unix::fs::symlink("../data/rel/v1", b.join("srv/current")).expect("symlink");
        let way = way_to(&b.join("srv/current/run"));
        // As a set: the absolute link starts again from `/`, through `b`'s ancestors again.
        let entered: BTreeSet<&Path> = way.entered.iter().map(PathBuf::as_path).collect();
        let mut expected: BTreeSet<PathBuf> = b
            .ancestors()
            .filter(|a| a.parent().is_some())
            .map(Path::to_owned)
            .collect();
        expected.extend(
            [
                "srv",
                "data",
                "abs",
                "abs/rel",
                "abs/rel/v1",
                "abs/rel/v1/run",
            ]
            .map(|d| b.join(d)),
        );
        assert_eq!(
            entered,
            expected.iter().map(PathBuf::as_path).collect(),
            "{way:?}"
        );
        assert_eq!(way.link_dirs, [b.join("srv"), b.join("data")], "{way:?}");
    }

    /// A path that leads nowhere stops where it does, with what it went through so far.
    #[test]
    fn the_way_stops_where_the_path_leads_nowhere() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = std::fs::canonicalize(base.path()).expect("canonicalize");
        let way = way_to(&b.join("missing/run"));
        assert_eq!(way.entered.last(), Some(&b), "{way:?}");
        assert!(way.link_dirs.is_empty(), "{way:?}");
    }
}
