//! Restoring exclusion when only the lock file was removed: re-created, locked, recorded and
//! verified under the same checks as an acquisition, or found lost.
//! Must not: re-create anything after a release or a loss, nor report the loss itself.

use std::os::fd::AsRawFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::dir::check_dir;
use super::held::{MAX_RECREATIONS, Now};
use super::ofd::{lock_exclusive, retry_eintr};
use super::open::set_new_file_owner_and_mode;
use super::record::write_whole;
use super::walk::{Walked, walk_dir};
use super::watch::WatchHandle;

/// What [`WatchHandle::recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The path leads to the file the lock is on: nothing is lost.
    Held,
    /// Our lock file was removed, and we made and locked a new one at the same path.
    Recreated,
    /// The lock was released meanwhile: there is nothing to watch any more.
    Released,
    /// The lock no longer excludes other copies: a loss.
    Lost,
}

impl WatchHandle {
    /// Called when [`WatchHandle::check_path`] found a change: restores exclusion if the only
    /// change is that someone removed our lock file (an administrator cleaning `/run/lock`, a
    /// tmp cleaner). Then the file we hold has no name at all (`st_nlink == 0`) while our
    /// directory is still the one its path leads to, with every check of the way to it that
    /// an acquisition makes; nobody else can have locked a file at the path without creating
    /// it, so we create it (`O_CREAT | O_EXCL`, its mode set as on acquisition), lock it without
    /// waiting, write our record and verify that the path leads to it and that it is held.
    /// Any failure is a loss, exactly as before: another copy made the file first (`EEXIST`)
    /// or locked it, a file renamed over ours (our file unlinked *and* another one at the path),
    /// our file renamed away (it still has a name), the directory moved, removed, replaced or
    /// mounted over, a symlink on the way retargeted.
    ///
    /// `above` is the watch's inotify instance: a re-created file's descriptor is put above it,
    /// as [`HeldLock::move_above`](super::held::HeldLock::move_above) does on acquisition. Serialised with the other watches and
    /// with release; once a loss is found, nothing is re-created any more.
    pub(crate) fn recover(&self, above: Option<std::os::fd::RawFd>) -> Recovery {
        let mut now = self.shared.now();
        if now.released {
            return Recovery::Released;
        }
        if now.lost {
            return Recovery::Lost;
        }
        if self.path_as(now.dev, now.ino).is_none() {
            // Another watch re-created it already, or the change went away.
            return Recovery::Held;
        }
        match self.recreate(&mut now, above) {
            Ok(()) => {
                tracing::warn!(path = %self.path.display(),
                    "the lock file was removed; re-created it, and the instance is still held");
                Recovery::Recreated
            }
            Err(why) => {
                tracing::debug!(path = %self.path.display(), why, "the lock file cannot be re-created");
                now.lost = true;
                Recovery::Lost
            }
        }
    }

    /// The body of [`WatchHandle::recover`], with the shared state locked; `Err` says why not.
    fn recreate(
        &self,
        now: &mut Now,
        above: Option<std::os::fd::RawFd>,
    ) -> std::result::Result<(), &'static str> {
        let shared = &*self.shared;
        let (plan, lock_dir) = (&shared.plan, &shared.lock_dir);
        if now.recreated >= MAX_RECREATIONS {
            return Err("re-created too many times already");
        }
        // Held only here, under the lock of `now`, and never after release (see `Files`).
        let Some(files) = shared.files.upgrade() else {
            return Err("released");
        };
        // Unlinked, not renamed away or linked elsewhere: it has no name left.
        match rustix::fs::fstat(files.newest()) {
            Ok(st) if st.st_nlink == 0 => {}
            Ok(_) => return Err("our file still has a name elsewhere"),
            Err(_) => return Err("cannot stat our file"),
        }
        // Our directory is still the one the path leads to, checked all the way as an
        // acquisition checks it.
        let euid = rustix::process::geteuid().as_raw();
        let Ok(dir_st) = rustix::fs::fstat(&*self.dir) else {
            return Err("cannot stat our directory");
        };
        match walk_dir(plan, euid) {
            Ok(Walked::Found(_, st, _))
                if (st.st_dev, st.st_ino) == (dir_st.st_dev, dir_st.st_ino)
                    && check_dir(plan, &st, euid).is_ok() => {}
            Ok(_) => return Err("the path leads to another directory"),
            Err(_) => return Err("the way to the directory fails its checks"),
        }
        let flags = OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY
            | OFlags::NONBLOCK;
        let file = match retry_eintr(|| {
            rustix::fs::openat(
                &*self.dir,
                self.file_name.as_os_str(),
                flags,
                Mode::from_raw_mode(plan.file_mode),
            )
        }) {
            Ok(file) => file,
            Err(Errno::EXIST) => return Err("another file is at the path (another copy's)"),
            Err(_) => return Err("cannot create the file"),
        };
        let file = match above {
            Some(above) if file.as_raw_fd() <= above => {
                rustix::io::fcntl_dupfd_cloexec(&file, above + 1).unwrap_or(file)
            }
            _ => file,
        };
        // Locked before anything else: until then another copy may open and lock it (it is
        // empty, a lock file like any other), and then it is theirs, never ours to remove.
        if lock_exclusive(&file, false).is_err() {
            return Err("another copy locked the new file first");
        }
        let Ok(mut st) = rustix::fs::fstat(&file) else {
            return Err("cannot stat the new file");
        };
        // Ours, locked: removed again (while still locked) if anything below fails.
        let (dev, ino) = (st.st_dev, st.st_ino);
        let abandon = |why| {
            if self.in_dir_as(dev, ino).is_none() {
                let _ =
                    rustix::fs::unlinkat(&*self.dir, self.file_name.as_os_str(), AtFlags::empty());
            }
            Err(why)
        };
        if set_new_file_owner_and_mode(plan, &file, &self.path, &mut st, euid, lock_dir).is_err() {
            return abandon("cannot set the new file's owner and mode");
        }
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
            return abandon("the new file is not a regular file with one name");
        }
        if write_whole(&file, &now.record).is_err() {
            return abandon("cannot write our record");
        }
        if !self.verify_held_as(dev, ino) {
            return abandon("the path does not lead to the new file, held");
        }
        if let Err(_file) = files.push(file) {
            // Cannot happen: there is a slot for each re-creation, and one for `move_above`.
            return abandon("no room for the new file's descriptor");
        }
        now.recreated += 1;
        (now.dev, now.ino, now.keep_file) = (dev, ino, false);
        Ok(())
    }
}
