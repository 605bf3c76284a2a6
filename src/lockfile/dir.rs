//! The lock directory: opened (made if this process may make it), checked, and re-opened when it
//! is removed or replaced under an attempt.
//! Must not: open or lock the lock file itself (`open.rs`, `attempt.rs`).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::plan::LockPlan;

use super::netfs::network_fs_name;
use super::walk::{Walked, check_on_the_way, walk_dir};
use super::watch::{Way, others_may_rename_in};

/// An open lock directory that passed [`open_dir`]'s checks.
#[derive(Debug, Clone)]
pub(crate) struct LockDir {
    pub(super) fd: Arc<OwnedFd>,
    /// Root's, sticky and writable by all, like `/run/lock`: see `owner_acceptable`.
    pub(super) shared_sticky: bool,
    /// A per-service directory's owner (the service's user): see `owner_acceptable`.
    pub(super) service_owner: Option<u32>,
    /// What the walk found at the path: an attempt that finds another directory there now, or
    /// none, starts over (see [`LockDir::is_current`]).
    dev: u64,
    ino: u64,
    /// As [`open_dir`] was asked, for opening it again.
    allow_network_fs: bool,
    /// The way the walk went to it, for the watches set up as the lock is taken.
    pub(super) way: Arc<Way>,
}

impl LockDir {
    /// The directory's identity (device, inode): another value after [`lock`](super::attempt::lock) opened it again.
    pub(super) fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Does the path of `plan` still lead to this directory? Not when it was removed (`rm -r`,
    /// a logout emptying `/run/user/UID`) or replaced (renamed away, another made in its place)
    /// since it was opened, or when a symlink on the way was retargeted (a deploy flipping
    /// `current -> releases/vN`): a lock taken in it then excludes nobody who opens the path
    /// now. So the path as given is followed as it is now, its symlinks with it, never the
    /// one the walk resolved then (which a flipped link does not touch). One `stat`. An error
    /// other than "gone" says yes: the attempt itself then reports it.
    pub(super) fn is_current(&self, plan: &LockPlan) -> bool {
        match rustix::fs::stat(&plan.dir) {
            Ok(st) => (st.st_dev, st.st_ino) == (self.dev, self.ino),
            Err(Errno::NOENT | Errno::NOTDIR) => false,
            Err(_) => true,
        }
    }

    /// Has the directory lost its last name (removed, with everything in it)? Asked only when
    /// a file could not be created or vanished: one `fstat`.
    pub(super) fn removed(&self) -> bool {
        rustix::fs::fstat(&*self.fd).is_ok_and(|st| st.st_nlink == 0)
    }

    /// Opens the lock directory again, made again as [`open_dir`] makes it, after it was
    /// removed or replaced under an attempt.
    pub(super) fn reopen(&mut self, plan: &LockPlan) -> Result<()> {
        tracing::debug!(dir = %plan.dir.display(), "the lock directory was removed or replaced; opening it again");
        *self = open_dir_again(plan, self.allow_network_fs)?;
        Ok(())
    }
}

/// How many times the lock directory may be removed or replaced under one acquisition before
/// it gives up: only a process removing it on purpose, in a loop, gets anywhere near it.
pub(super) const MAX_DIR_RACES: u32 = 1000;

/// Opens (creating if needed) and checks the lock directory, and every directory and symlink on
/// the way to it (see [`walk_dir`]). A directory removed between our `mkdir` and our `open` is
/// walked to again (and made again), a bounded number of times.
pub(crate) fn open_dir(plan: &LockPlan, allow_network_fs: bool) -> Result<LockDir> {
    match open_dir_again(plan, allow_network_fs) {
        Err(e @ Error::Io { .. }) if is_not_found(&e) => Err(missing_directory(plan).unwrap_or(e)),
        other => other,
    }
}

/// Is `e` an I/O error saying that something is not there?
pub(super) fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// What a lock directory (or one above it) found missing before anything is made is, for the
/// caller to fix, when it is not an internal error: the directory of a lock file given
/// explicitly, which is never made; or a directory above a lock directory given (only the lock
/// directory itself is made). `None` for the directories this crate makes itself. (Missing
/// later, while a copy waits, it is an I/O error as before: see `LockDir::reopen`.) `status`
/// says the same as an acquisition.
pub(super) fn missing_directory(plan: &LockPlan) -> Option<Error> {
    if plan.create_dir_mode.is_none() && !plan.service_dir {
        return Some(Error::InvalidOption {
            option: "lock_file",
            value: plan.path(),
            reason: format!(
                "its directory {} does not exist (it is not made for a lock file given \
                 explicitly); create it or choose another lock path",
                plan.dir.display()
            ),
        });
    }
    if !plan.shared_system_dir && !plan.private_dir && !plan.service_dir {
        return Some(Error::InvalidOption {
            option: "lock_dir",
            value: plan.dir.clone(),
            reason: "a directory above it does not exist (only the lock directory itself is \
                     made); create it or choose another lock directory"
                .into(),
        });
    }
    None
}

/// [`open_dir`] once an attempt is under way: every error as it is.
fn open_dir_again(plan: &LockPlan, allow_network_fs: bool) -> Result<LockDir> {
    for _ in 0..MAX_DIR_RACES {
        match open_dir_once(plan, allow_network_fs, true) {
            Ok(Some(dir)) => return Ok(dir),
            Ok(None) => {}
            // The service's own directory, there when the copy planned it, gone now (its
            // deployment removed, or made again): not an internal error. A copy started again
            // plans what is there then.
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && plan.service_dir =>
            {
                return Err(Error::NoUsableBackend {
                    name: plan.instance.clone(),
                    reason: format!(
                        "the service's lock directory {} was removed as this copy started or \
                         waited (its deployment removed?): start it again",
                        plan.dir.display()
                    ),
                    source: None,
                });
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::io(
        "the lock directory keeps being removed as it is made at",
        &plan.dir,
        std::io::Error::from(std::io::ErrorKind::Interrupted),
    ))
}

/// [`open_dir`] for a directory that must be there already, with the same checks: it is never
/// made (a lock handed to another process is kept in the directory it was taken in, see
/// `handed.rs`).
pub(super) fn open_existing_dir(plan: &LockPlan, allow_network_fs: bool) -> Result<LockDir> {
    open_dir_once(plan, allow_network_fs, false)?
        .ok_or_else(|| dir_error(plan, "cannot open lock directory", Errno::NOENT))
}

/// [`open_dir`], once; `None` when the directory vanished between two of our calls. `create`:
/// the directory may be made, if this process may make it.
fn open_dir_once(plan: &LockPlan, allow_network_fs: bool, create: bool) -> Result<Option<LockDir>> {
    let euid = rustix::process::geteuid().as_raw();
    // The shared system directory must be root's: one made by another user would be that user's
    // to empty (the owner of a sticky directory may remove anything in it), and every other copy
    // would rightly refuse it. So only root creates it (or systemd-tmpfiles at boot).
    let may_create = create && may_create_dir(plan, euid);
    // Walked, not opened by path: the usual case costs no `mkdir`, and nothing on the way is
    // followed before it is checked.
    let (dir, st, way) = match walk_dir(plan, euid)? {
        Walked::Found(dir, st, way) => (dir, st, way),
        Walked::Missing(parent, name, way) if may_create => {
            let mode = plan.create_dir_mode.unwrap_or(0o700);
            let made = match make_dir_at_once(&parent, &name, mode) {
                // Made with its mode, never changed after: what is at the name is opened below
                // as whatever it is, and checked.
                Ok(true) => Ok(MadeDir::Exists),
                Ok(false) => make_dir(&parent, &name, mode),
                Err(e) => Err(e),
            };
            let made = match made {
                Ok(MadeDir::Made(dir)) => Some(dir),
                Ok(MadeDir::Exists) => None,
                // Not the directory we made, at its temporary name or at its name: left as it
                // is, and walked to again.
                Ok(MadeDir::Swapped) => return Ok(None),
                Ok(MadeDir::CannotTell) => {
                    return Err(not_permitted(
                        plan,
                        format!(
                            "the lock directory {} does not exist, and a copy cannot make it \
                             safely: the directory above it may be renamed in by its group, and \
                             this file system does not say when a directory was made, so the \
                             copy cannot tell the one it made from one swapped in; make it \
                             yourself (`install -d -m {:o} {}`{})",
                            plan.dir.display(),
                            mode,
                            plan.dir.display(),
                            if plan.shared_system_dir {
                                ", or install the tmpfiles.d file that `unique-instance \
                                 generate` writes"
                            } else {
                                ""
                            }
                        ),
                        Errno::PERM,
                    ));
                }
                Err(e) => return Err(dir_error(plan, "cannot create lock directory", e)),
            };
            let dir = match made {
                Some(dir) => dir,
                None => {
                    let dir = rustix::fs::openat(
                        &parent,
                        &name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    );
                    match dir {
                        Ok(dir) => dir,
                        // Removed again since whoever made it did: again.
                        Err(Errno::NOENT) => return Ok(None),
                        // Someone put a symlink there since our mkdir failed with EEXIST.
                        Err(Errno::LOOP | Errno::NOTDIR) => {
                            return Err(Error::UnsafeLockPath {
                                path: plan.dir.clone(),
                                problem: UnsafeLockPath::Symlink,
                            });
                        }
                        Err(e) => return Err(dir_error(plan, "cannot open lock directory", e)),
                    }
                }
            };
            let st = rustix::fs::fstat(&dir)
                .map_err(|e| Error::io("cannot stat lock directory", &plan.dir, e.into()))?;
            check_on_the_way(plan, &plan.dir, &st, euid, true)?;
            let way = Way {
                others_may_rename: way.others_may_rename || others_may_rename_in(st.st_mode),
                ..way
            };
            (dir, st, way)
        }
        Walked::Missing(..) if create && plan.create_dir_mode.is_some() => {
            return Err(not_permitted(
                plan,
                format!(
                    "the system lock directory {} does not exist, and only root may create it: \
                     install the tmpfiles.d file that `unique-instance generate` writes and run \
                     `systemd-tmpfiles --create`, or run one copy as root",
                    plan.dir.display()
                ),
                Errno::NOENT,
            ));
        }
        Walked::Missing(..) => {
            return Err(dir_error(plan, "cannot open lock directory", Errno::NOENT));
        }
    };
    check_dir(plan, &st, euid)?;
    if !allow_network_fs {
        let fs = rustix::fs::fstatfs(&dir)
            .map_err(|e| Error::io("cannot statfs lock directory", &plan.dir, e.into()))?;
        if let Some(fs_type) = network_fs_name(fs.f_type as i64) {
            return Err(Error::NetworkFilesystem {
                path: plan.dir.clone(),
                fs_type,
            });
        }
    }
    Ok(Some(LockDir {
        way: Arc::new(way),
        fd: Arc::new(dir),
        shared_sticky: st.st_uid == 0 && st.st_mode & 0o1000 != 0 && st.st_mode & 0o002 != 0,
        service_owner: plan.service_dir.then_some(st.st_uid),
        dev: st.st_dev,
        ino: st.st_ino,
        allow_network_fs,
    }))
}

/// Makes the directory `name` in `parent` with exactly `mode` in one `mkdir`, on a thread of
/// its own with a umask of its own (`unshare(CLONE_FS)`, then `umask(0)`): nothing is
/// chmodded after, so nothing put at the name meanwhile can be (reviews: root gave the lock
/// directory's mode to a directory swapped in, in a parent its group may rename in, however
/// the one made was told from others). `Ok(true)` when made, or when something has the name
/// already (`EEXIST`: the caller opens what is there); `Ok(false)` when such a thread cannot be
/// had (a sandbox refusing `unshare`), or the parent has a default ACL: see [`make_dir`].
fn make_dir_at_once(
    parent: &OwnedFd,
    name: &std::ffi::OsStr,
    mode: u32,
) -> rustix::io::Result<bool> {
    // A default ACL on the parent, not the umask, decides what a new directory's permissions
    // are, whatever `mkdir` asks (a review: the shared directory made 1775, every other user
    // refused for good): made as without `unshare`, and given its mode after.
    // (The parent is open `O_PATH`, which `fgetxattr` refuses: looked at through `/proc`;
    // where that cannot be done, as if it had one.)
    let through = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(parent));
    match rustix::fs::getxattr_query(through.as_str(), "system.posix_acl_default") {
        Ok(0) | Err(Errno::NODATA | Errno::OPNOTSUPP) => {}
        Ok(_) | Err(_) => return Ok(false),
    }
    let parent = parent
        .try_clone()
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    let name = name.to_owned();
    let made = std::thread::Builder::new()
        .name("unique-instance-mkdir".into())
        .spawn(
            move || -> rustix::io::Result<Option<rustix::io::Result<()>>> {
                // SAFETY: `CLONE_FS` gives this thread its own root, working directory and umask;
                // it shares no file descriptor table change (`CLONE_FILES` is not asked), and the
                // thread ends right after its one `mkdir`.
                #[allow(unsafe_code)]
                if unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }
                    .is_err()
                {
                    return Ok(None);
                }
                rustix::process::umask(Mode::empty());
                Ok(Some(rustix::fs::mkdirat(
                    &parent,
                    &name,
                    Mode::from_raw_mode(mode),
                )))
            },
        )
        .ok()
        .and_then(|thread| thread.join().ok());
    match made {
        Some(Ok(Some(Ok(()) | Err(Errno::EXIST)))) => Ok(true),
        Some(Ok(Some(Err(e)))) => Err(e),
        _ => Ok(false),
    }
}

/// What [`make_dir`] did.
enum MadeDir {
    /// Made, with its mode, and named: open.
    Made(OwnedFd),
    /// Something else has the name already.
    Exists,
    /// What it made was swapped for another directory before it was ready, or what has its name
    /// now is not what it made: nothing is done to that one.
    Swapped,
    /// Where others may rename in the parent, the file system does not say when the directory
    /// found at the temporary name was made (no birth time), so it cannot be told from one
    /// swapped in: nothing is done to it.
    CannotTell,
}

/// Makes the directory `name` in `parent`, with exactly `mode`: made under a temporary name
/// first, opened, given its mode through that descriptor, and only then its name, unless
/// something has it by then. Made at its name and given its mode after, a copy killed in
/// between left it at its name with the umask's mode (a review killed root's copy so: every
/// other user's copy was refused for good, the shared directory left `0700`), and one whose
/// umask leaves its owner no read permission could not open it to set the mode. Only the
/// directory made is ever given the mode (see [`open_made_dir`]), and once renamed, the name
/// must lead to it. Where the file system cannot rename so (`RENAME_NOREPLACE`), made at its
/// name, with the same checks. A copy killed before the rename leaves the temporary directory
/// behind.
fn make_dir(parent: &OwnedFd, name: &std::ffi::OsStr, mode: u32) -> rustix::io::Result<MadeDir> {
    use super::open::{MAX_TEMPORARY_TRIES, temporary_name};
    use rustix::fs::AtFlags;
    // Where nobody but its owner (root or us: the walk's rule) and root may rename in the
    // parent, a name there leads to what we made.
    let safe_parent = rustix::fs::fstat(parent).is_ok_and(|st| !others_may_rename_in(st.st_mode));
    let mut tries = 0;
    let (temporary, made_after) = loop {
        let temporary = temporary_name();
        let made_after = birth_time_floor();
        match rustix::fs::mkdirat(parent, temporary.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => break (temporary, made_after),
            Err(Errno::EXIST) if tries < MAX_TEMPORARY_TRIES => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let remove = || {
        let _ = rustix::fs::unlinkat(parent, temporary.as_str(), AtFlags::REMOVEDIR);
    };
    let dir = match open_made_dir(parent, temporary.as_ref(), safe_parent, made_after) {
        Ok(Found::Ours(dir)) => dir,
        Ok(Found::NotOurs) => return Ok(MadeDir::Swapped),
        Ok(Found::CannotTell) => {
            remove();
            return Ok(MadeDir::CannotTell);
        }
        Err(e) => {
            remove();
            return Err(e);
        }
    };
    if let Err(e) = rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode)) {
        remove();
        return Err(e);
    }
    let renamed = rustix::fs::renameat_with(
        parent,
        temporary.as_str(),
        parent,
        name,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    match renamed {
        Ok(()) if names(parent, name, &dir) => Ok(MadeDir::Made(dir)),
        Ok(()) => Ok(MadeDir::Swapped),
        Err(Errno::EXIST) => {
            remove();
            Ok(MadeDir::Exists)
        }
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            remove();
            let made_after = birth_time_floor();
            match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(Errno::EXIST) => return Ok(MadeDir::Exists),
                Err(e) => return Err(e),
            }
            // Made by us, so given its mode even once another copy has made its lock file in
            // it (a review: skipped then, the umask's mode stayed for good); one that cannot be
            // opened, or told from one swapped in, is removed again, not left at its name.
            let dir = match open_made_dir(parent, name, safe_parent, made_after) {
                Ok(Found::Ours(dir)) => dir,
                Ok(Found::NotOurs) => return Ok(MadeDir::Swapped),
                Ok(Found::CannotTell) => {
                    let _ = rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR);
                    return Ok(MadeDir::CannotTell);
                }
                Err(e) => {
                    let _ = rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR);
                    return Err(e);
                }
            };
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))?;
            Ok(MadeDir::Made(dir))
        }
        Err(e) => {
            remove();
            Err(e)
        }
    }
}

/// A time no later than the birth time a file system gives a directory made from now on: file
/// systems take it from the coarse clock, which may lag the precise one by a tick.
fn birth_time_floor() -> rustix::time::Timespec {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    // A tick or two of slack: 20 ms.
    let nanos = i64::from(now.tv_nsec as i32) - 20_000_000;
    if nanos < 0 {
        rustix::time::Timespec {
            tv_sec: now.tv_sec - 1,
            tv_nsec: (nanos + 1_000_000_000) as _,
        }
    } else {
        rustix::time::Timespec {
            tv_sec: now.tv_sec,
            tv_nsec: nanos as _,
        }
    }
}

/// What [`open_made_dir`] found.
enum Found {
    Ours(OwnedFd),
    NotOurs,
    CannotTell,
}

/// Opens the directory just made (`mkdir`, mode 0700, no earlier than `made_after`) at `name`
/// in `parent`, if it is still what is there: a private directory of ours, and, where others
/// may rename in the parent, born since (its group could swap in any private directory of
/// ours: a review had root make its `/run/lock/lvm` world-writable so, where `/run/lock` is
/// `0775 root:uucp`). A umask that took its owner's read or search permission is undone through
/// a handle that needs none (`O_PATH`, and `/proc/self/fd`), so only that directory is changed.
fn open_made_dir(
    parent: &OwnedFd,
    name: &std::ffi::OsStr,
    safe_parent: bool,
    made_after: rustix::time::Timespec,
) -> rustix::io::Result<Found> {
    use rustix::fs::{AtFlags, StatxFlags};
    let handle = match rustix::fs::openat(
        parent,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(handle) => handle,
        Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Ok(Found::NotOurs),
        Err(e) => return Err(e),
    };
    let st = rustix::fs::statx(
        &handle,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )?;
    let mode = u32::from(st.stx_mode);
    if st.stx_uid != rustix::process::geteuid().as_raw() || mode & 0o077 != 0 {
        return Ok(Found::NotOurs);
    }
    if !safe_parent {
        if st.stx_mask & StatxFlags::BTIME.bits() == 0 {
            return Ok(Found::CannotTell);
        }
        let born = (st.stx_btime.tv_sec, i64::from(st.stx_btime.tv_nsec));
        if born < (made_after.tv_sec, i64::from(made_after.tv_nsec as i32)) {
            return Ok(Found::NotOurs);
        }
    }
    if mode & 0o700 != 0o700 {
        let through = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&handle));
        match rustix::fs::chmod(through.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            // No `/proc`: by name, where only we may rename in the parent.
            Err(_) if safe_parent => {
                rustix::fs::chmodat(parent, name, Mode::from_raw_mode(0o700), AtFlags::empty())?
            }
            Err(e) => return Err(e),
        }
    }
    let dir = rustix::fs::openat(
        &handle,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Found::Ours(dir))
}

/// Whether `name` in `parent` leads to `dir` (not following a symlink there).
fn names(parent: &OwnedFd, name: &std::ffi::OsStr, dir: &OwnedFd) -> bool {
    let at_name = rustix::fs::statat(parent, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
    match (at_name, rustix::fs::fstat(dir)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// Whether this process may create the lock directory if it is missing.
fn may_create_dir(plan: &LockPlan, euid: u32) -> bool {
    plan.create_dir_mode.is_some() && !(plan.shared_system_dir && euid != 0)
}

/// The refusal of a lock directory that is there but where no file can be made at all (`ENOENT`
/// from an `O_CREAT` open in a directory that still exists: `/proc`, `/sys`): a lock path the
/// user chose (64), not a directory removed again and again (a review saw 70 after a thousand
/// tries).
pub(super) fn makes_no_files(plan: &LockPlan) -> Error {
    let explicit_file = plan.create_dir_mode.is_none() && !plan.service_dir;
    let reason = format!(
        "no file can be made in {} (its file system makes none, as /proc and /sys); choose a \
         lock path on one that holds files, such as /run/lock or /tmp",
        plan.dir.display()
    );
    if explicit_file {
        Error::InvalidOption {
            option: "lock_file",
            value: plan.path(),
            reason,
        }
    } else {
        Error::InvalidOption {
            option: "lock_dir",
            value: plan.dir.clone(),
            reason,
        }
    }
}

pub(super) fn dir_error(plan: &LockPlan, context: &'static str, e: Errno) -> Error {
    // A path the user gave that cannot name a directory: theirs to fix (64), not an internal
    // error (a review saw 70 for each of these).
    let given = !plan.shared_system_dir && !plan.private_dir && !plan.service_dir;
    let why = match e {
        Errno::NOTDIR => Some("something on the way to it is not a directory"),
        Errno::LOOP => Some("the symbolic links on the way to it loop, or are too many"),
        Errno::NAMETOOLONG => Some("it, or a name in it, is too long"),
        _ => None,
    };
    if given && let Some(why) = why {
        let explicit_file = plan.create_dir_mode.is_none();
        return Error::InvalidOption {
            option: if explicit_file {
                "lock_file"
            } else {
                "lock_dir"
            },
            value: if explicit_file {
                plan.path()
            } else {
                plan.dir.clone()
            },
            reason: format!(
                "{context} {}: {why}; choose another lock path",
                plan.dir.display()
            ),
        };
    }
    if e == Errno::ROFS {
        return Error::NotPermitted {
            name: plan.instance.clone(),
            reason: format!(
                "{context} {}: it is on a read-only file system; choose a lock directory on a \
                 writable one",
                plan.dir.display()
            ),
            source: Some(Box::new(std::io::Error::from(e))),
        };
    }
    if e == Errno::ACCESS || e == Errno::PERM {
        Error::NotPermitted {
            name: plan.instance.clone(),
            reason: format!(
                "{context} {}: {}; run with the right user or choose another lock directory",
                plan.dir.display(),
                std::io::Error::from(e)
            ),
            source: Some(Box::new(std::io::Error::from(e))),
        }
    } else {
        Error::io(context, &plan.dir, e.into())
    }
}

pub(super) fn check_dir(plan: &LockPlan, st: &Stat, euid: u32) -> Result<()> {
    let unsafe_dir = |problem| Error::UnsafeLockPath {
        path: plan.dir.clone(),
        problem,
    };
    let owner = st.st_uid;
    let mode = st.st_mode & 0o7777;
    if plan.private_dir {
        if owner != euid {
            return Err(unsafe_dir(UnsafeLockPath::ForeignDirectory {
                dir: plan.dir.clone(),
                owner,
            }));
        }
        if mode & 0o777 != 0o700 {
            return Err(unsafe_dir(UnsafeLockPath::DirectoryMode {
                dir: plan.dir.clone(),
                mode,
            }));
        }
        return Ok(());
    }
    if plan.service_dir {
        // Only root and the service's user may write it: nobody else can squat its lock file.
        if mode & 0o022 != 0 {
            return Err(unsafe_dir(UnsafeLockPath::InsecureDirectory {
                dir: plan.dir.clone(),
                mode,
            }));
        }
        return Ok(());
    }
    if owner != euid && owner != 0 {
        return Err(unsafe_dir(UnsafeLockPath::ForeignDirectory {
            dir: plan.dir.clone(),
            owner,
        }));
    }
    // Anyone who can write the directory without the sticky bit can remove our file.
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(UnsafeLockPath::InsecureDirectory {
            dir: plan.dir.clone(),
            mode,
        }));
    }
    Ok(())
}

pub(super) fn not_permitted(plan: &LockPlan, reason: String, e: Errno) -> Error {
    Error::NotPermitted {
        name: plan.instance.clone(),
        reason,
        source: Some(Box::new(std::io::Error::from(e))),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    pub(in crate::lockfile) fn private_plan(dir: &Path) -> LockPlan {
        LockPlan {
            instance: "org.example.Test".into(),
            dir: dir.to_owned(),
            file_name: "org.example.Test.lock".into(),
            root_may_own: false,
            shared_system_dir: false,
            create_dir_mode: Some(0o700),
            private_dir: true,
            service_dir: false,
            file_mode: 0o600,
        }
    }

    #[test]
    fn per_user_fallback_directory_must_be_ours_and_0700() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        // Created by us: made 0700 whatever the umask, and accepted.
        let fresh = base.path().join("fresh");
        open_dir(&private_plan(&fresh), false).expect("a fresh private directory is accepted");
        let mode = std::fs::metadata(&fresh)
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o700);
        // Pre-created by someone with a looser mode: refused, not "fixed".
        let loose = base.path().join("loose");
        std::fs::create_dir(&loose).expect("mkdir");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(matches!(
            open_dir(&private_plan(&loose), false),
            Err(Error::UnsafeLockPath {
                problem: UnsafeLockPath::DirectoryMode { mode: 0o755, .. },
                ..
            })
        ));
        // Pre-created by another user: refused.
        if rustix::process::geteuid().is_root() {
            let foreign = base.path().join("foreign");
            std::fs::create_dir(&foreign).expect("mkdir");
            std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            std::os::unix::fs::chown(&foreign, Some(65534), None).expect("chown");
            assert!(matches!(
                open_dir(&private_plan(&foreign), false),
                Err(Error::UnsafeLockPath {
                    problem: UnsafeLockPath::ForeignDirectory { owner: 65534, .. },
                    ..
                })
            ));
        }
    }

    #[test]
    fn only_root_creates_the_shared_system_directory() {
        let shared = LockPlan {
            instance: "org.example.Test".into(),
            dir: PathBuf::from(crate::SYSTEM_LOCK_DIR),
            file_name: "org.example.Test.lock".into(),
            root_may_own: true,
            shared_system_dir: true,
            create_dir_mode: Some(0o1777),
            private_dir: false,
            service_dir: false,
            file_mode: 0o644,
        };
        assert!(may_create_dir(&shared, 0));
        assert!(!may_create_dir(&shared, 1000));
        // Directories of one's own (per-user, or given explicitly) are anyone's to create.
        let own = private_plan(Path::new("/tmp/x"));
        assert!(may_create_dir(&own, 1000));
        let given = LockPlan {
            shared_system_dir: false,
            ..shared
        };
        assert!(may_create_dir(&given, 1000));
    }
}
