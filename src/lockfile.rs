//! The lock-file backend: an exclusive open-file-description lock on a file that is opened
//! safely, re-checked after locking, and removed only while still locked.
//!
//! Open-file-description (OFD) locks (`F_OFD_SETLK`), not `flock`: both belong to the open file,
//! not to the process (so closing some other descriptor of the file never drops them, as it does
//! classic `fcntl` locks), but only an OFD lock can be *tested* without being taken
//! (`F_OFD_GETLK`). So `status`, and a user who may only read another user's lock file, learn
//! whether it is held without ever holding it, even for an instant, which would make a copy
//! starting at that moment believe the instance is running. And an exclusive OFD lock needs a
//! descriptor open for writing, so a user who may only read the file cannot squat it.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::holder::{Holder, LockRecord, MAX_RECORD_LEN};
use crate::plan::LockPlan;

/// How long a refused copy waits for a just-started holder to write its record before it
/// reports the holder as unknown. The holder writes it right after locking, before it connects to
/// the bus, so the wait is normally a few system calls long.
const RECORD_GRACE: Duration = Duration::from_secs(2);

/// A lock file this process holds. Dropping it removes the file (if it is still ours, and this
/// acquisition created it or took it over from a crashed holder) while the lock is held, then
/// unlocks.
#[derive(Debug)]
pub(crate) struct HeldLock {
    /// The descriptors of the lock, owned here alone (see [`Files`]).
    files: Arc<Files>,
    dir: Arc<OwnedFd>,
    file_name: OsString,
    path: PathBuf,
    released: bool,
    /// The length of the longest record written, which a shorter one is padded to.
    record_len: usize,
    /// The process that took the lock. After a `fork` the child shares our open file
    /// description, and with it the lock: only this process may remove the file.
    pid: u32,
    /// What the lock's watches share with it: which file the lock is on now.
    shared: Arc<Shared>,
}

/// How many times a holder re-creates its lock file after someone removed it (see
/// [`WatchHandle::recover`]) before it takes a removal for a loss: each re-created file's
/// descriptor is kept until the lock is released, and a process removing it in a loop is not
/// a tmp cleaner.
const MAX_RECREATIONS: usize = 64;

/// The descriptors of a held lock, newest last: the file as locked, its duplicate above the
/// watch's inotify instance ([`HeldLock::move_above`]), and files re-created since
/// ([`WatchHandle::recover`]). Only added to, never closed before the lock is dropped:
/// [`HeldLock::as_fd`] lends the newest for as long as the lock lives (a descriptor closed under
/// a borrower could be reused for another file), and `run`'s COMMAND holds a duplicate of an
/// older one anyway. Owned by the [`HeldLock`] alone (its watches hold a [`Weak`] reference,
/// used only under [`Shared::now`] and never after release), so that dropping the lock closes
/// them all, and frees the lock, before release returns.
#[derive(Debug)]
struct Files {
    first: OwnedFd,
    more: [OnceLock<OwnedFd>; MAX_RECREATIONS + 1],
}

impl Files {
    /// The descriptor of the file the lock is on now.
    fn newest(&self) -> &OwnedFd {
        self.more
            .iter()
            .rev()
            .find_map(OnceLock::get)
            .unwrap_or(&self.first)
    }

    /// Adds `fd` as the newest; gives it back when there is no room. Called only with
    /// [`Shared::now`] locked, so that two callers never race for a slot.
    fn push(&self, fd: OwnedFd) -> std::result::Result<(), OwnedFd> {
        match self.more.iter().find(|slot| slot.get().is_none()) {
            Some(slot) => slot.set(fd),
            None => Err(fd),
        }
    }
}

/// The part of a held lock that its watches share with it: a watch that finds the lock file
/// unlinked re-creates it ([`WatchHandle::recover`]), and from then on the lock is on the new
/// file — the one release removes, and the one the watches compare the path with.
#[derive(Debug)]
struct Shared {
    now: Mutex<Now>,
    files: std::sync::Weak<Files>,
    /// What re-creating the file needs: the checks of the directory and of a new file.
    plan: LockPlan,
    lock_dir: LockDir,
}

/// Which file the lock is on, and what a re-creation must know.
#[derive(Debug)]
struct Now {
    dev: u64,
    ino: u64,
    /// How many times the file was re-created.
    recreated: usize,
    /// The file was there, empty, before we took it: someone else's (or a holder's that died
    /// before writing its record), so it is never removed, only emptied again on release. A
    /// re-created file is ours.
    keep_file: bool,
    /// The last record written, for a re-created file.
    record: Vec<u8>,
    /// Released (or being released): nothing is re-created any more.
    released: bool,
    /// A loss was found: nothing is re-created any more (a loss is never taken back).
    lost: bool,
}

impl Shared {
    fn now(&self) -> MutexGuard<'_, Now> {
        // A panic elsewhere while it was held leaves nothing half-done that matters here.
        self.now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The outcome of one attempt.
// Returned once per attempt and taken apart at once: boxing the large variant would only add an
// allocation to the acquire path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Attempt {
    /// Locked; carries the previous holder's record, if the file had one (a crashed holder's).
    Acquired(HeldLock, Option<LockRecord>),
    /// Someone else holds it.
    Busy(Box<Holder>),
}

/// What changed under a held lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathChange {
    Removed,
    Replaced,
}

/// An open lock directory that passed [`open_dir`]'s checks.
#[derive(Debug, Clone)]
pub(crate) struct LockDir {
    fd: Arc<OwnedFd>,
    /// Root's, sticky and writable by all, like `/run/lock`: see `owner_acceptable`.
    shared_sticky: bool,
    /// A per-service directory's owner (the service's user): see `owner_acceptable`.
    service_owner: Option<u32>,
    /// Where the walk found it (no symlinks, no `..`), and what was there: an attempt that
    /// finds another directory there now, or none, starts over (see [`LockDir::is_current`]).
    resolved: PathBuf,
    dev: u64,
    ino: u64,
    /// As [`open_dir`] was asked, for opening it again.
    allow_network_fs: bool,
}

impl LockDir {
    /// The directory's identity (device, inode): another value after [`lock`] opened it again.
    pub(crate) fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Does the path still lead to this directory? Not when it was removed (`rm -r`, a logout
    /// emptying `/run/user/UID`) or replaced (renamed away, another made in its place) since
    /// it was opened: a lock taken in it then excludes nobody who opens the path now. One
    /// `stat`. An error other than "gone" says yes: the attempt itself then reports it.
    fn is_current(&self) -> bool {
        match rustix::fs::stat(&self.resolved) {
            Ok(st) => (st.st_dev, st.st_ino) == (self.dev, self.ino),
            Err(Errno::NOENT | Errno::NOTDIR) => false,
            Err(_) => true,
        }
    }

    /// Has the directory lost its last name (removed, with everything in it)? Asked only when
    /// a file could not be created or vanished: one `fstat`.
    fn removed(&self) -> bool {
        rustix::fs::fstat(&*self.fd).is_ok_and(|st| st.st_nlink == 0)
    }

    /// Opens the lock directory again, made again as [`open_dir`] makes it, after it was
    /// removed or replaced under an attempt.
    fn reopen(&mut self, plan: &LockPlan) -> Result<()> {
        tracing::debug!(dir = %plan.dir.display(), "the lock directory was removed or replaced; opening it again");
        *self = open_dir(plan, self.allow_network_fs)?;
        Ok(())
    }
}

/// How many times the lock directory may be removed or replaced under one acquisition before
/// it gives up: only a process removing it on purpose, in a loop, gets anywhere near it.
const MAX_DIR_RACES: u32 = 1000;

/// Opens (creating if needed) and checks the lock directory, and every directory and symlink on
/// the way to it (see [`walk_dir`]). A directory removed between our `mkdir` and our `open` is
/// walked to again (and made again), a bounded number of times.
pub(crate) fn open_dir(plan: &LockPlan, allow_network_fs: bool) -> Result<LockDir> {
    for _ in 0..MAX_DIR_RACES {
        if let Some(dir) = open_dir_once(plan, allow_network_fs)? {
            return Ok(dir);
        }
    }
    Err(Error::io(
        "the lock directory keeps being removed as it is made at",
        &plan.dir,
        std::io::Error::from(std::io::ErrorKind::Interrupted),
    ))
}

/// [`open_dir`], once; `None` when the directory vanished between two of our calls.
fn open_dir_once(plan: &LockPlan, allow_network_fs: bool) -> Result<Option<LockDir>> {
    let euid = rustix::process::geteuid().as_raw();
    // The shared system directory must be root's: one made by another user would be that user's
    // to empty (the owner of a sticky directory may remove anything in it), and every other copy
    // would rightly refuse it. So only root creates it (or systemd-tmpfiles at boot).
    let may_create = may_create_dir(plan, euid);
    // Walked, not opened by path: the usual case costs no `mkdir`, and nothing on the way is
    // followed before it is checked.
    let (dir, st, resolved) = match walk_dir(plan, euid)? {
        Walked::Found(dir, st, resolved) => (dir, st, resolved),
        Walked::Missing(parent, name, above) if may_create => {
            let created = match rustix::fs::mkdirat(&parent, &name, Mode::from_raw_mode(0o700)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(dir_error(plan, "cannot create lock directory", e)),
            };
            let dir = rustix::fs::openat(
                &parent,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            let dir = match dir {
                Ok(dir) => dir,
                // Removed again since our mkdir (or since the one of whoever made it): again.
                Err(Errno::NOENT) => return Ok(None),
                // Someone put a symlink there since our mkdir failed with EEXIST.
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(Error::UnsafeLockPath {
                        path: plan.dir.clone(),
                        problem: UnsafeLockPath::Symlink,
                    });
                }
                Err(e) => return Err(dir_error(plan, "cannot open lock directory", e)),
            };
            if created && let Some(mode) = plan.create_dir_mode {
                // mkdir's mode is masked by the umask; set the intended one exactly, on the
                // directory we opened (the path could have been swapped in between).
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode)).map_err(|e| {
                    Error::io("cannot set the mode of lock directory", &plan.dir, e.into())
                })?;
            }
            let st = rustix::fs::fstat(&dir)
                .map_err(|e| Error::io("cannot stat lock directory", &plan.dir, e.into()))?;
            check_on_the_way(plan, &plan.dir, &st, euid, true)?;
            (dir, st, above.join(&name))
        }
        Walked::Missing(..) if plan.create_dir_mode.is_some() => {
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
        fd: Arc::new(dir),
        shared_sticky: st.st_uid == 0 && st.st_mode & 0o1000 != 0 && st.st_mode & 0o002 != 0,
        service_owner: plan.service_dir.then_some(st.st_uid),
        resolved,
        dev: st.st_dev,
        ino: st.st_ino,
        allow_network_fs,
    }))
}

/// How many symlinks a lock directory's path may go through, as the kernel allows (`ELOOP`).
const MAX_SYMLINKS: u32 = 40;

/// The end of [`walk_dir`].
enum Walked {
    /// The directory, open, its `fstat`, and the path it was found at.
    Found(OwnedFd, Stat, PathBuf),
    /// Only the path's own last component is missing: the directory above it, the name, and
    /// the path of the directory above.
    Missing(OwnedFd, OsString, PathBuf),
}

/// Resolves the lock directory's path one component at a time from `/`, the way the kernel
/// would, but checking everything before it is used: every directory on the way must belong to
/// root or to this user and may be writable by others only with the sticky bit; every symlink
/// on the way must belong to root or to this user (its owner decides where it points, and the
/// owner of the directory holding it may replace it). Otherwise another user could make the
/// path lead somewhere else while a copy holds its lock, and a second copy would lock another
/// file.
///
/// Cheap on the usual path: one `lstat` per ancestor, then the directory itself is opened
/// (`O_NOFOLLOW`) and `fstat`ed as before. Checking by path is sound here because each checked
/// entry belongs to root or to us and sits in a directory that nobody else may rename entries
/// of, so nobody else can swap it between the check and the use.
fn walk_dir(plan: &LockPlan, euid: u32) -> Result<Walked> {
    use std::collections::VecDeque;
    use std::path::Component;
    // Each component with whether it is the path's own last one (not one from a link's target).
    let components = |path: &Path, last_is_own: bool| -> Vec<(OsString, bool)> {
        let parts: Vec<OsString> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, last_is_own && i + 1 == n))
            .collect()
    };
    let io = |context, e: Errno| Error::io(context, &plan.dir, e.into());
    if !plan.dir.is_absolute() {
        return Err(io("lock directory is not absolute", Errno::INVAL));
    }
    let root = Path::new("/");
    let st = rustix::fs::lstat(root).map_err(|e| io("cannot stat / on the way to", e))?;
    check_on_the_way(plan, root, &st, euid, false)?;
    // Always a real directory path, free of symlinks and `..`, every part of it checked.
    let mut resolved = PathBuf::from("/");
    let mut queue: VecDeque<(OsString, bool)> = components(&plan.dir, true).into();
    let mut links = 0;
    while let Some((name, own_last)) = queue.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        let st = if queue.is_empty() {
            // The directory itself: opened, and checked on its descriptor.
            match rustix::fs::open(
                &here,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(dir) => {
                    let st =
                        rustix::fs::fstat(&dir).map_err(|e| io("cannot stat lock directory", e))?;
                    check_on_the_way(plan, &here, &st, euid, own_last)?;
                    return Ok(Walked::Found(dir, st, here));
                }
                Err(Errno::NOENT) if own_last => {
                    let parent = rustix::fs::open(
                        &resolved,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| dir_error(plan, "cannot open lock directory", e))?;
                    return Ok(Walked::Missing(parent, name, resolved));
                }
                // Maybe a symlink: looked at below.
                Err(Errno::LOOP | Errno::NOTDIR) => rustix::fs::lstat(&here)
                    .map_err(|e| dir_error(plan, "cannot open lock directory", e))?,
                Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                    // Most often another user made it first (a 0700 directory of theirs): say
                    // whose it is, rather than only "permission denied".
                    if let Ok(st) = rustix::fs::lstat(&here)
                        && FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    {
                        check_on_the_way(plan, &here, &st, euid, own_last)?;
                    }
                    return Err(dir_error(plan, "cannot open lock directory", e));
                }
                Err(e) => return Err(dir_error(plan, "cannot open lock directory", e)),
            }
        } else {
            rustix::fs::lstat(&here)
                .map_err(|e| dir_error(plan, "cannot open lock directory", e))?
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                check_on_the_way(plan, &here, &st, euid, false)?;
                resolved = here;
            }
            FileType::Symlink => {
                // The per-user and per-service directories themselves are never symlinks.
                if own_last && (plan.private_dir || plan.service_dir) {
                    return Err(Error::UnsafeLockPath {
                        path: plan.dir.clone(),
                        problem: UnsafeLockPath::Symlink,
                    });
                }
                if st.st_uid != 0 && st.st_uid != euid {
                    return Err(Error::UnsafeLockPath {
                        path: plan.dir.clone(),
                        problem: UnsafeLockPath::ForeignSymlink {
                            link: here,
                            owner: st.st_uid,
                        },
                    });
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io("too many symbolic links on the way to", Errno::LOOP));
                }
                let target = std::fs::read_link(&here)
                    .map_err(|e| Error::io("cannot read symbolic link", &here, e))?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for part in components(&target, false).into_iter().rev() {
                    queue.push_front(part);
                }
            }
            _ => return Err(io("cannot open lock directory", Errno::NOTDIR)),
        }
    }
    // The path was `/` itself, or ended in `..`: open what it resolved to.
    let dir = rustix::fs::open(
        &resolved,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| dir_error(plan, "cannot open lock directory", e))?;
    let st = rustix::fs::fstat(&dir).map_err(|e| io("cannot stat lock directory", e))?;
    check_on_the_way(plan, &resolved, &st, euid, false)?;
    Ok(Walked::Found(dir, st, resolved))
}

/// The rule for each directory on the way to the lock directory (see [`walk_dir`]). A
/// per-service directory itself may belong to the service's user (root made it so: only root
/// can write the directory above it).
fn check_on_the_way(
    plan: &LockPlan,
    dir: &Path,
    st: &Stat,
    euid: u32,
    own_last: bool,
) -> Result<()> {
    let owner = st.st_uid;
    let mode = st.st_mode & 0o7777;
    let unsafe_dir = |problem| Error::UnsafeLockPath {
        path: plan.dir.clone(),
        problem,
    };
    if owner != euid && owner != 0 && !(own_last && plan.service_dir) {
        return Err(unsafe_dir(UnsafeLockPath::ForeignDirectory {
            dir: dir.to_owned(),
            owner,
        }));
    }
    // Anyone who can write it without the sticky bit can rename what is below it.
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(UnsafeLockPath::InsecureDirectory {
            dir: dir.to_owned(),
            mode,
        }));
    }
    Ok(())
}

/// Whether this process may create the lock directory if it is missing.
fn may_create_dir(plan: &LockPlan, euid: u32) -> bool {
    plan.create_dir_mode.is_some() && !(plan.shared_system_dir && euid != 0)
}

fn dir_error(plan: &LockPlan, context: &'static str, e: Errno) -> Error {
    if e == Errno::ACCESS || e == Errno::PERM || e == Errno::ROFS {
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

fn check_dir(plan: &LockPlan, st: &Stat, euid: u32) -> Result<()> {
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

/// How many times the file may vanish or appear between our own two system calls before we
/// give up: only a process churning the directory on purpose gets anywhere near it.
const MAX_OPEN_RACES: u32 = 1000;

/// Tries once (or, with `block`, waits) to lock the file of `plan` in `dir`.
///
/// Refused, it reads the holder's record with [`read_holder`]'s grace, which blocks for up to
/// [`RECORD_GRACE`]: from async code use [`lock_async`].
///
/// A lock directory removed or replaced under the attempt is opened (made) again, and
/// `lock_dir` then is the new one: see [`settle`].
pub(crate) fn lock(plan: &LockPlan, lock_dir: &mut LockDir, block: bool) -> Result<Attempt> {
    Ok(match settle(plan, lock_dir, block)? {
        Step::Acquired(held, previous) => Attempt::Acquired(held, previous),
        Step::Busy(file) => Attempt::Busy(Box::new(read_holder(&file, &plan.path()))),
    })
}

/// Tries once to lock the file of `plan` in `dir`, without blocking the executor: every system
/// call it makes returns at once, and the grace a just-started holder gets to write its record
/// is awaited ([`read_holder_async`]). As [`lock`], it may replace `lock_dir`.
pub(crate) async fn lock_async(plan: &LockPlan, lock_dir: &mut LockDir) -> Result<Attempt> {
    Ok(match settle(plan, lock_dir, false)? {
        Step::Acquired(held, previous) => Attempt::Acquired(held, previous),
        Step::Busy(file) => Attempt::Busy(Box::new(read_holder_async(&file, &plan.path()).await)),
    })
}

/// One attempt ([`lock_step`]) that ends in the lock directory the path leads to *now*: when
/// the directory was removed (its files with it) or replaced while we opened, locked or were
/// refused the file, the lock taken or the holder seen belongs to a directory nobody else will
/// find any more, so it starts over from the directory, made again under the same rules (see
/// [`open_dir`]), a bounded number of times.
fn settle(plan: &LockPlan, lock_dir: &mut LockDir, block: bool) -> Result<Step> {
    static STOPPED: AtomicBool = AtomicBool::new(false);
    stop_for_test("UNIQUE_INSTANCE_TEST_STOP_BEFORE_LOCK_FILE", &STOPPED);
    for _ in 0..MAX_DIR_RACES {
        match lock_step(plan, lock_dir, block)? {
            // Held or refused in a directory that is still the path's: the answer.
            Some(step) if lock_dir.is_current() => return Ok(step),
            // Dropped unused: a lock taken in a removed directory releases nothing anyone
            // needs (a file we made in a directory renamed away is removed by the drop).
            _ => lock_dir.reopen(plan)?,
        }
    }
    Err(Error::io(
        "the lock directory keeps being removed or replaced under us at",
        &plan.dir,
        std::io::Error::from(std::io::ErrorKind::Interrupted),
    ))
}
/// Test hook (debug builds only): when the variable `var` is set, stops this process (`SIGSTOP`)
/// right there, the first time it gets there (`stopped` remembers), so that a test can act at a
/// moment it could not otherwise reach, then let it go on with `SIGCONT`. Release builds never
/// look at the variable.
pub(crate) fn stop_for_test(var: &str, stopped: &AtomicBool) {
    if cfg!(debug_assertions)
        && std::env::var_os(var).is_some()
        && !stopped.swap(true, Ordering::Relaxed)
    {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }
}

/// An attempt, before the holder's record is read.
// Returned once per attempt and taken apart at once, as `Attempt` is.
#[allow(clippy::large_enum_variant)]
enum Step {
    Acquired(HeldLock, Option<LockRecord>),
    /// Held by someone else: the file, to read the holder's record from.
    Busy(OwnedFd),
}

/// One attempt in `lock_dir`; `None` when the directory was removed under it.
fn lock_step(plan: &LockPlan, lock_dir: &LockDir, block: bool) -> Result<Option<Step>> {
    let euid = rustix::process::geteuid().as_raw();
    let path = plan.path();
    let dir = &lock_dir.fd;
    let mut races = 0;
    loop {
        races += 1;
        if races > MAX_OPEN_RACES {
            return Err(Error::io(
                "the lock file keeps being removed and created under us at",
                &path,
                std::io::Error::from(std::io::ErrorKind::Interrupted),
            ));
        }
        let opened = match open_lock_file(plan, dir, &path, euid, lock_dir, block) {
            Ok(Some(opened)) => opened,
            // The file vanished or appeared between two of our calls (retry), or the whole
            // directory went: nothing can be created in a removed directory (`ENOENT`).
            Ok(None) | Err(_) if lock_dir.removed() => return Ok(None),
            Ok(None) => continue,
            Err(e) => return Err(e),
        };
        let no_locks = || Error::NoUsableBackend {
            name: plan.instance.clone(),
            reason: format!(
                "the file system of {} does not support locks",
                path.display()
            ),
            source: Some(Box::new(std::io::Error::from(Errno::NOLCK))),
        };
        let (file, st, created) = match opened {
            (Opened::Writable(file, created), st) => (file, st, created),
            (Opened::ReadOnly(file, why), st) => {
                // A file we may only read (another user's), or must only read (not a lock file
                // of ours): we can tell who holds it, but we can never be the instance through
                // it (we could neither lock it for writing, nor record ourselves in it, nor
                // remove it).
                let held = match why {
                    ReadOnlyBecause::Held => Ok(true),
                    _ => is_held(&file),
                };
                match held {
                    Ok(true) if !block => {
                        return Ok(Some(Step::Busy(file)));
                    }
                    Ok(true) => {
                        // Its holder removes it when it lets go; then we can make our own. So
                        // wait for that with a shared lock, dropped (with `file`) at once.
                        match wait_unlocked(&file) {
                            Ok(()) => continue,
                            Err(Errno::NOLCK) => return Err(no_locks()),
                            Err(e) => return Err(Error::io("cannot wait for", &path, e.into())),
                        }
                    }
                    Ok(false) => {}
                    Err(Errno::NOLCK) => return Err(no_locks()),
                    Err(e) => return Err(Error::io("cannot test the lock on", &path, e.into())),
                }
                return Err(match why {
                    ReadOnlyBecause::NotOurs => not_a_lock_file(plan, &path),
                    ReadOnlyBecause::NoWritePermission | ReadOnlyBecause::Held => not_permitted(
                        plan,
                        format!(
                            "lock file {} belongs to uid {} and this user may not write it, so \
                             this user cannot hold the instance through it (no copy holds it \
                             now): run as its owner (or root), or have them remove it",
                            path.display(),
                            st.st_uid
                        ),
                        Errno::ACCESS,
                    ),
                });
            }
        };
        match lock_exclusive(&file, block) {
            Ok(()) => {}
            Err(Errno::AGAIN | Errno::ACCESS) => {
                return Ok(Some(Step::Busy(file)));
            }
            Err(Errno::NOLCK) => return Err(no_locks()),
            Err(e) => return Err(Error::io("cannot lock", &path, e.into())),
        }
        // `st` is the open file's, from before the lock: the descriptor still names that inode.
        // The holder before us may have removed the file while we waited on the old inode, or
        // someone replaced it: then the lock we hold protects nothing. Start again.
        match rustix::fs::statat(dir, plan.file_name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
            Ok(_) | Err(Errno::NOENT) => {
                tracing::debug!(path = %path.display(), "lock file was replaced while we locked it; retrying");
                continue;
            }
            Err(e) => return Err(Error::io("cannot stat", &path, e.into())),
        }
        let content = read_content(&file)
            .map_err(|e| Error::io("cannot read the lock file", &path, e.into()))?;
        // Checked before it was opened for writing, and again now that nobody else can be
        // writing a record into it: data written in meanwhile is not ours to truncate. (`file`
        // is dropped unused: unlocked, never removed.)
        if !is_ours(&content) {
            return Err(not_a_lock_file(plan, &path));
        }
        let previous = LockRecord::parse_whole(&content);
        // Clear a crashed holder's record at once, so nobody reports a dead PID while we set up.
        // (An empty file, the usual case, needs no truncation: one system call less.)
        if !content.is_empty() {
            retry_eintr(|| rustix::fs::ftruncate(&file, 0))
                .map_err(|e| Error::io("cannot truncate", &path, e.into()))?;
        }
        let files = Arc::new(Files {
            first: file,
            more: [const { OnceLock::new() }; MAX_RECREATIONS + 1],
        });
        let shared = Arc::new(Shared {
            now: Mutex::new(Now {
                dev: st.st_dev,
                ino: st.st_ino,
                recreated: 0,
                // Created by us, or a crashed holder's: ours to remove. Found empty: kept.
                keep_file: !created && content.is_empty(),
                record: Vec::new(),
                released: false,
                lost: false,
            }),
            files: Arc::downgrade(&files),
            plan: plan.clone(),
            lock_dir: lock_dir.clone(),
        });
        return Ok(Some(Step::Acquired(
            HeldLock {
                files,
                dir: Arc::clone(dir),
                file_name: plan.file_name.clone(),
                path,
                released: false,
                record_len: 0,
                pid: std::process::id(),
                shared,
            },
            previous,
        )));
    }
}

/// A lock file, opened.
enum Opened {
    /// Ours to lock and write; `true` when this call created it (`O_CREAT | O_EXCL`).
    Writable(OwnedFd, bool),
    /// A file opened only for reading: enough to learn whether (and by whom) it is held, tested
    /// without being taken (`F_OFD_GETLK`), but not to become the instance.
    ReadOnly(OwnedFd, ReadOnlyBecause),
}

/// Why a lock file was opened only for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadOnlyBecause {
    /// Another user's file that this user may not write.
    NoWritePermission,
    /// Neither empty nor a whole holder record: someone else's data, never ours to write or
    /// remove.
    NotOurs,
    /// Found held (tested, not taken) by a copy that will not wait: already running.
    Held,
}

/// Whether `content` (the start of a file at the lock path, see [`read_content`]) may be used as
/// a lock file: empty (just created, or by a holder that died before writing its record; used,
/// but never removed) or one holder record and nothing else (a crashed holder's, see
/// [`LockRecord::parse_whole`]). Anything else is someone's data, which unique-instance never
/// writes into or removes.
fn is_ours(content: &[u8]) -> bool {
    content.is_empty() || LockRecord::parse_whole(content).is_some()
}

fn not_a_lock_file(plan: &LockPlan, path: &Path) -> Error {
    Error::NotALockFile {
        name: plan.instance.clone(),
        path: path.to_owned(),
    }
}

fn not_permitted(plan: &LockPlan, reason: String, e: Errno) -> Error {
    Error::NotPermitted {
        name: plan.instance.clone(),
        reason,
        source: Some(Box::new(std::io::Error::from(e))),
    }
}

/// Opens the lock file, creating it if it does not exist. `None` when it vanished or appeared
/// between two of our calls: try again.
///
/// A missing file is created with `O_CREAT | O_EXCL`: then it is ours. An existing one is opened
/// *without* `O_CREAT`, and first only for reading: it is opened for writing only once it is
/// known to be a regular file with one name holding nothing but a lock file's content (see
/// [`is_ours`]). So a data file or a script given as the lock path is never truncated, written
/// or removed, and a running executable is never opened for writing (which would fail with
/// `ETXTBSY`, and take it from whoever runs it next). Under `fs.protected_regular` (which
/// systemd turns on in every booted system) an `O_CREAT` open of another user's file in a sticky
/// world-writable directory fails with `EACCES` even for root, so a copy started by root would
/// otherwise be refused the file of a service running under its own user, instead of being
/// told that service is running.
fn open_lock_file(
    plan: &LockPlan,
    dir: &OwnedFd,
    path: &Path,
    euid: u32,
    lock_dir: &LockDir,
    block: bool,
) -> Result<Option<(Opened, Stat)>> {
    let unsafe_path = |problem| Error::UnsafeLockPath {
        path: path.to_owned(),
        problem,
    };
    // NONBLOCK keeps a FIFO planted at the path from blocking the open; it is refused below.
    let flags = OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let open = |flags: OFlags| {
        retry_eintr(|| {
            rustix::fs::openat(
                dir,
                plan.file_name.as_os_str(),
                flags,
                Mode::from_raw_mode(plan.file_mode),
            )
        })
    };
    let refused = |e: Errno| match e {
        Errno::LOOP => unsafe_path(UnsafeLockPath::Symlink),
        Errno::ISDIR => unsafe_path(UnsafeLockPath::NotRegularFile { kind: "directory" }),
        Errno::NXIO => unsafe_path(UnsafeLockPath::NotRegularFile { kind: "socket" }),
        e if e == Errno::ACCESS || e == Errno::PERM || e == Errno::ROFS => not_permitted(
            plan,
            format!(
                "cannot open lock file {}: {}; run as its owner or choose another lock path",
                path.display(),
                std::io::Error::from(e)
            ),
            e,
        ),
        e => Error::io("cannot open lock file", path, e.into()),
    };
    let fstat = |file: &OwnedFd| {
        rustix::fs::fstat(file).map_err(|e| Error::io("cannot stat", path, e.into()))
    };
    // What every file at the path must be; `false`: it has no name any more (retry).
    let check = |st: &Stat| -> Result<bool> {
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != FileType::RegularFile {
            return Err(unsafe_path(UnsafeLockPath::NotRegularFile {
                kind: file_type_name(file_type),
            }));
        }
        // No name at all: its holder removed it between our open and this check (it does so
        // on every release). A race to retry, not an attack: the path names a fresh file, or
        // nothing.
        if st.st_nlink == 0 {
            return Ok(false);
        }
        // A second name for the file means it may be someone else's file linked in here (say
        // /etc/shadow, where protected_hardlinks is off), which we would truncate and write.
        if st.st_nlink != 1 {
            #[allow(clippy::unnecessary_cast)] // `st_nlink` is narrower on some architectures
            let links = st.st_nlink as u64;
            return Err(unsafe_path(UnsafeLockPath::HardLinked { links }));
        }
        Ok(true)
    };
    let writable = |file: OwnedFd, st: Stat, created: bool| -> Result<Option<(Opened, Stat)>> {
        if !check(&st)? {
            return Ok(None);
        }
        if !owner_acceptable(plan, euid, st.st_uid, lock_dir) {
            return Err(unsafe_path(UnsafeLockPath::WrongOwner {
                owner: st.st_uid,
                expected: euid,
            }));
        }
        Ok(Some((Opened::Writable(file, created), st)))
    };
    // Created first: a released lock file is removed, so a missing file is the usual case and
    // costs one call. `O_EXCL` fails on anything already there (a symlink included) before any
    // other check, and that is then opened as it is.
    match open(flags | OFlags::RDWR | OFlags::CREATE | OFlags::EXCL) {
        Ok(file) => {
            let mut st = fstat(&file)?;
            set_new_file_owner_and_mode(plan, &file, path, &mut st, euid, lock_dir)?;
            return writable(file, st, true);
        }
        Err(Errno::EXIST) => {}
        // The directory was removed (nothing can be created in it): see `lock_step`.
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(refused(e)),
    }
    let file = match open(flags | OFlags::RDONLY) {
        Ok(file) => file,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(refused(e)),
    };
    let st = fstat(&file)?;
    if !check(&st)? {
        return Ok(None);
    }
    let content =
        read_content(&file).map_err(|e| Error::io("cannot read the lock file", path, e.into()))?;
    if !is_ours(&content) {
        return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::NotOurs), st)));
    }
    // Held, and we will not wait: already running, learnt without opening it for writing.
    if !block && is_held(&file) == Ok(true) {
        return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::Held), st)));
    }
    match open(flags | OFlags::RDWR) {
        Ok(rw) => {
            let now = fstat(&rw)?;
            // Another file took the name between our two opens: its content is unchecked.
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                return Ok(None);
            }
            writable(rw, now, false)
        }
        Err(Errno::NOENT) => Ok(None),
        Err(e) if e == Errno::ACCESS || e == Errno::PERM => Ok(Some((
            Opened::ReadOnly(file, ReadOnlyBecause::NoWritePermission),
            st,
        ))),
        Err(e) => Err(refused(e)),
    }
}

/// Gives a lock file we just created its intended mode, whatever the umask (under `umask 077`
/// a system lock file would be 0600, and other users could no longer see who runs), and, when
/// root creates it in a service's own directory, the service's user as owner, so that the
/// service can still take it if root's copy dies without removing it. Costs nothing when the
/// umask left the mode as asked (the `fstat` is made anyway).
fn set_new_file_owner_and_mode(
    plan: &LockPlan,
    file: &OwnedFd,
    path: &Path,
    st: &mut Stat,
    euid: u32,
    lock_dir: &LockDir,
) -> Result<()> {
    if let Some(owner) = lock_dir.service_owner.filter(|&o| euid == 0 && o != 0) {
        rustix::fs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(owner)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        )
        .map_err(|e| {
            Error::io(
                "cannot give the lock file to the service's user",
                path,
                e.into(),
            )
        })?;
        st.st_uid = owner;
    }
    if st.st_mode & 0o7777 != plan.file_mode {
        rustix::fs::fchmod(file, Mode::from_raw_mode(plan.file_mode))
            .map_err(|e| Error::io("cannot set the mode of lock file", path, e.into()))?;
        st.st_mode = (st.st_mode & !0o7777) | plan.file_mode;
    }
    Ok(())
}

/// Whose lock file we may lock and write: our own; in system scope, root's; and, for root in
/// system scope, any user's file in a root-owned sticky world-writable directory (the shared
/// system lock directory). That last case is the service running under its own `User=` whose
/// lock file a copy started by root must meet: the sticky bit guarantees only that user and root
/// can remove or rename the file, a single link guarantees it is not some other file in
/// disguise, and the lock and the record are all root writes into it. Likewise, for root, the
/// file of a per-service directory's owner (the service's user): only they and root can write
/// that directory. Elsewhere a foreign file is refused, because its owner, not the directory's,
/// decides what it is.
fn owner_acceptable(plan: &LockPlan, euid: u32, owner: u32, lock_dir: &LockDir) -> bool {
    owner == euid
        || (plan.root_may_own
            && (owner == 0
                || (euid == 0
                    && (lock_dir.shared_sticky || lock_dir.service_owner == Some(owner)))))
}

fn file_type_name(t: FileType) -> &'static str {
    match t {
        FileType::Directory => "directory",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Symlink => "symbolic link",
        _ => "special file",
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Writes `line` at offset 0 of `file` with one `pwrite` (see [`HeldLock::write_record`]).
fn write_whole(file: &OwnedFd, line: &[u8]) -> std::io::Result<()> {
    let n = retry_eintr(|| rustix::io::pwrite(file, line, 0))?;
    if n != line.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// The start of the file: at most [`MAX_RECORD_LEN`] bytes and one more, however large the file
/// is (anyone who can create a file at the path chooses its size).
fn read_content(file: &OwnedFd) -> rustix::io::Result<Vec<u8>> {
    // One byte more than a record: to tell a whole record from one followed by more.
    let mut buf = vec![0u8; MAX_RECORD_LEN + 1];
    let n = retry_eintr(|| rustix::io::pread(file, &mut buf, 0))?;
    buf.truncate(n);
    Ok(buf)
}

/// A holder of `path` of whom nothing is known.
fn unknown_holder(path: &Path) -> Holder {
    Holder {
        found_by: Some(crate::holder::BackendKind::LockFile),
        lock_file: Some(path.to_owned()),
        ..Holder::default()
    }
}

/// One look at a held file's record: `Some` when that is the answer (the record, or a holder
/// unknown because the file cannot be read), `None` when there is no record (yet).
///
/// A read error is not an empty record: it is logged, and the holder is unknown at once (no
/// grace: waiting cannot make the file readable). Either way the file stays held: the kernel
/// lock decides, never what could be read of it.
fn look_at_record(file: &OwnedFd, path: &Path) -> Option<Holder> {
    match read_content(file) {
        Ok(content) => LockRecord::parse(&content)
            .filter(|record| !names_a_process_gone_from_here(record))
            .map(|record| record.into_holder(path.to_owned())),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %std::io::Error::from(e),
                "cannot read the holder record of a held lock file; the holder is unknown");
            Some(unknown_holder(path))
        }
    }
}

/// Does `record` name a process of this host that no longer exists? Then it is the record of a
/// holder that died, which the copy now holding the lock has not cleared yet (it does so right
/// after locking): it is treated like an empty file, given the same grace, and the holder is
/// reported as unknown if it stays, never as the dead process. (Also the case of a `run`
/// wrapper killed while its COMMAND keeps the lock.) Only for reporting: the kernel lock
/// decides who holds the instance. A holder in another PID namespace with our host name looks
/// gone too: it is then reported as unknown, after the grace.
fn names_a_process_gone_from_here(record: &LockRecord) -> bool {
    let here = rustix::system::uname();
    if record.hostname.as_deref().map(str::as_bytes) != Some(here.nodename().to_bytes()) {
        return false;
    }
    i32::try_from(record.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process(pid) == Err(Errno::SRCH))
}

/// An inotify instance (non-blocking) that becomes readable when `path` is written, for the
/// grace a holder gets to write its record. `None` when one cannot be had.
fn record_watch(path: &Path) -> Option<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok()?;
    inotify::add_watch(&inotify, path, WatchFlags::MODIFY | WatchFlags::CLOSE_WRITE).ok()?;
    Some(inotify)
}

/// Reads the holder's record. A holder writes it just after locking, so an empty file is given a
/// short, event-driven grace (inotify, no polling) before the holder is reported as unknown.
///
/// This blocks for up to [`RECORD_GRACE`]: from async code use [`read_holder_async`].
fn read_holder(file: &OwnedFd, path: &Path) -> Holder {
    if let Some(holder) = look_at_record(file, path) {
        return holder;
    }
    match record_watch(path) {
        Some(inotify) => await_record(file, path, &inotify, None, Instant::now() + RECORD_GRACE),
        None => unknown_holder(path),
    }
}

/// [`read_holder`] for async code, in any runtime (no I/O or time driver needed): the grace is
/// waited out on a thread of its own while the executor runs other tasks, and dropping the
/// future ends that thread at once (through `cancel`). The usual answer, a record already
/// there, costs no thread.
async fn read_holder_async(file: &OwnedFd, path: &Path) -> Holder {
    /// Wakes the waiting thread when the future is done or dropped.
    struct CancelOnDrop(Arc<OwnedFd>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
        }
    }
    if let Some(holder) = look_at_record(file, path) {
        return holder;
    }
    let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
    let (Some(inotify), Ok(cancel), Ok(file)) = (
        record_watch(path),
        rustix::event::eventfd(0, flags),
        file.try_clone(),
    ) else {
        return unknown_holder(path);
    };
    let cancel = Arc::new(cancel);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (thread_cancel, thread_path) = (Arc::clone(&cancel), path.to_owned());
    let deadline = Instant::now() + RECORD_GRACE;
    let spawned = std::thread::Builder::new()
        .name("unique-instance-record".into())
        .spawn(move || {
            let holder = await_record(
                &file,
                &thread_path,
                &inotify,
                Some(&thread_cancel),
                deadline,
            );
            let _ = tx.send(holder);
        });
    if spawned.is_err() {
        return unknown_holder(path);
    }
    let _cancel = CancelOnDrop(cancel);
    rx.await.unwrap_or_else(|_| unknown_holder(path))
}

/// Waits for the holder's record to be written (`inotify`, a [`record_watch`] on `path`) until
/// `deadline`, or until `cancel` becomes readable; reads it again after every event.
fn await_record(
    file: &OwnedFd,
    path: &Path,
    inotify: &OwnedFd,
    cancel: Option<&OwnedFd>,
    deadline: Instant,
) -> Holder {
    use rustix::event::{PollFd, PollFlags};
    loop {
        // Re-read after the watch is in place, so a write between the two is not missed.
        if let Some(holder) = look_at_record(file, path) {
            return holder;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return unknown_holder(path);
        }
        let mut fds = vec![PollFd::new(inotify, PollFlags::IN)];
        if let Some(cancel) = cancel {
            fds.push(PollFd::new(cancel, PollFlags::IN));
        }
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match retry_eintr(|| rustix::event::poll(&mut fds, Some(&ts))) {
            Ok(n) if n > 0 => {
                if fds.get(1).is_some_and(|c| !c.revents().is_empty()) {
                    return unknown_holder(path);
                }
                drain(inotify);
            }
            _ => return unknown_holder(path),
        }
    }
}

pub(crate) fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// Reads everything queued on `fd` (an inotify instance); true when there was anything.
pub(crate) fn drain_any(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    let mut any = false;
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {
        any = true;
    }
    any
}

/// Reads the current holder of `path` without locking anything (for `status` and timeouts).
pub(crate) fn peek_holder(path: &Path) -> Option<Holder> {
    let file = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&file).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    Some(look_at_record(&file, path).unwrap_or_else(|| unknown_holder(path)))
}

/// Who holds the lock file at `path`, tested (`F_OFD_GETLK`) on a read-only descriptor: never
/// created, never written, never locked, so a copy starting at the same moment is not disturbed.
/// `None` when nobody holds it, or there is no such file. A holder whose record is not written
/// yet gets the short grace [`read_holder`] gives it.
///
/// This blocks for up to [`RECORD_GRACE`]: from async code use [`holder_of_async`].
pub(crate) fn holder_of(path: &Path) -> Result<Option<Holder>> {
    Ok(held_file(path)?.map(|file| read_holder(&file, path)))
}

/// [`holder_of`] for async code: the grace is awaited, not blocked on.
pub(crate) async fn holder_of_async(path: &Path) -> Result<Option<Holder>> {
    Ok(match held_file(path)? {
        Some(file) => Some(read_holder_async(&file, path).await),
        None => None,
    })
}

/// The file at `path`, opened read-only, when someone holds its lock.
fn held_file(path: &Path) -> Result<Option<OwnedFd>> {
    let file = match rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(f) => f,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(Error::UnsafeLockPath {
                path: path.to_owned(),
                problem: UnsafeLockPath::Symlink,
            });
        }
        Err(e) => return Err(Error::io("cannot open lock file", path, e.into())),
    };
    let st = rustix::fs::fstat(&file).map_err(|e| Error::io("cannot stat", path, e.into()))?;
    let file_type = FileType::from_raw_mode(st.st_mode);
    if file_type != FileType::RegularFile {
        return Err(Error::UnsafeLockPath {
            path: path.to_owned(),
            problem: UnsafeLockPath::NotRegularFile {
                kind: file_type_name(file_type),
            },
        });
    }
    match is_held(&file) {
        Ok(true) => Ok(Some(file)),
        Ok(false) => Ok(None),
        Err(e) => Err(Error::io("cannot test the lock on", path, e.into())),
    }
}

/// A write lock on the whole file, as `F_OFD_SETLK(W)` takes and `F_OFD_GETLK` tests it.
fn whole_file(lock_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: lock_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // to the end of the file, however long it grows
        l_pid: 0, // required by OFD locks
    }
}

/// Takes the exclusive OFD lock on `file` (open for writing), waiting for it with `block`.
/// Without `block`, `EAGAIN` or `EACCES` means someone else holds it. `EINTR` is retried.
fn lock_exclusive(file: &OwnedFd, block: bool) -> rustix::io::Result<()> {
    let lock = whole_file(libc::F_WRLCK);
    let arg = || {
        if block {
            FcntlArg::F_OFD_SETLKW(&lock)
        } else {
            FcntlArg::F_OFD_SETLK(&lock)
        }
    };
    retry_eintr(|| fcntl(file, arg()).map(drop).map_err(nix_errno))
}

/// Waits until nobody holds `file` exclusively, on a descriptor open only for reading, by taking
/// a shared lock; the caller drops it (closing `file`) at once. `EINTR` is retried.
fn wait_unlocked(file: &OwnedFd) -> rustix::io::Result<()> {
    let lock = whole_file(libc::F_RDLCK);
    retry_eintr(|| {
        fcntl(file, FcntlArg::F_OFD_SETLKW(&lock))
            .map(drop)
            .map_err(nix_errno)
    })
}

/// Does anyone hold a lock on `file` that would keep us from locking it exclusively? Asked
/// with `F_OFD_GETLK`, which takes nothing.
fn is_held(file: &OwnedFd) -> rustix::io::Result<bool> {
    let mut probe = whole_file(libc::F_WRLCK);
    retry_eintr(|| fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(nix_errno))?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_raw_os_error(e as i32)
}

impl HeldLock {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the holder record with one `pwrite` at offset 0 (the file was emptied when
    /// locked). It may be written again, completed (the bus's unique name, once connected): a
    /// reader sees the old line or the new one. A line shorter than one written before is
    /// padded with spaces before its newline to the old length rather than followed by a
    /// truncation, so that the file is one whole record at every moment (see
    /// [`LockRecord::parse_whole`]): a holder killed between a write and a truncation would
    /// otherwise leave a file that the next copy must refuse as not a lock file. A torn read
    /// fails to parse and is read again (see `read_holder`), never taken for a record.
    pub(crate) fn write_record(&mut self, record: &LockRecord) -> Result<()> {
        let mut line = record.to_line();
        if line.len() < self.record_len {
            // `to_line` ends with the newline; JSON allows the spaces before it.
            line.pop();
            line.resize(self.record_len - 1, b' ');
            line.push(b'\n');
        }
        let mut now = self.shared.now();
        write_whole(self.files.newest(), &line)
            .map_err(|e| Error::io("cannot write holder record to", &self.path, e))?;
        self.record_len = line.len();
        now.record = line;
        Ok(())
    }

    /// Gives the lock a descriptor numbered above `other` (an inotify instance watching it).
    ///
    /// When a process dies, the kernel closes its descriptors in ascending order but finishes
    /// releasing them in the reverse order; releasing an inotify instance waits for an RCU
    /// grace period (milliseconds). Above it, the lock is released first, so a copy waiting for
    /// it takes over in about a millisecond instead of 5 to 15 (measured by the take-over
    /// benchmark, against `flock(1)`, whose holders have no inotify instance). The lock belongs
    /// to the open file description, which the new descriptor keeps. (The bus connection's
    /// socket, which zbus opens, gets the same order by the inotify instance being made first.)
    pub(crate) fn move_above(&mut self, other: &OwnedFd) -> Result<()> {
        let _now = self.shared.now();
        let newest = self.files.newest();
        if newest.as_raw_fd() > other.as_raw_fd() {
            return Ok(());
        }
        let above = rustix::io::fcntl_dupfd_cloexec(newest, other.as_raw_fd() + 1)
            .map_err(|e| Error::io("cannot duplicate the descriptor of", &self.path, e.into()))?;
        // The one below stays open (see `Files`): the lock is released with the open file
        // description's last descriptor, this one, which is still the highest.
        if self.files.push(above).is_err() {
            tracing::debug!(path = %self.path.display(), "no room to move the lock's descriptor");
        }
        Ok(())
    }

    /// What a periodic re-check needs, without the lock itself.
    pub(crate) fn watch_handle(&self) -> WatchHandle {
        WatchHandle {
            dir: Arc::clone(&self.dir),
            file_name: self.file_name.clone(),
            path: self.path.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Removes the file while still holding the lock (only if the path is still our file), then
    /// unlocks by closing. A file that was there, empty, before we took it is not ours to
    /// remove: it is emptied again instead (our record out of it) and left where it was.
    ///
    /// In any process other than the one that took the lock (a child after `fork`) it only
    /// closes this process's descriptor: the open file description, and the lock with it, is
    /// shared with the process that took it, which still holds it and may still need the file.
    pub(crate) fn release(mut self) -> Result<()> {
        self.release_in_place()
    }

    fn release_in_place(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        if std::process::id() != self.pid {
            tracing::debug!(path = %self.path.display(), acquired_by = self.pid,
                "lock released in a forked process: its file and lock are left to the process that took them");
            return Ok(());
        }
        // Held until the file is gone: a watch re-creates nothing once it sees `released`.
        let mut now = self.shared.now();
        now.released = true;
        if now.keep_file {
            retry_eintr(|| rustix::fs::ftruncate(self.files.newest(), 0))
                .map_err(|e| Error::io("cannot empty lock file", &self.path, e.into()))?;
        } else if self.watch_handle().in_dir_as(now.dev, now.ino).is_none() {
            match rustix::fs::unlinkat(&*self.dir, self.file_name.as_os_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => {
                    return Err(Error::io("cannot remove lock file", &self.path, e.into()));
                }
            }
        }
        // Closing `file` (when self drops) releases the lock: waiters on this inode wake, see
        // that the path no longer names it, and retry on a fresh file.
        Ok(())
    }

    /// The descriptor (for tests that check it is not inherited).
    #[allow(dead_code)]
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
}

/// A new inotify instance, for [`WatchHandle::inotify`]. Made before the lock and the bus
/// connection are opened, so that their descriptors are numbered above it: see
/// [`HeldLock::move_above`] for why that order matters.
pub(crate) fn new_inotify() -> std::io::Result<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags};
    Ok(inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?)
}

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

/// Identifies a held lock file's path and inode, for re-checks from another task.
#[derive(Debug, Clone)]
pub(crate) struct WatchHandle {
    dir: Arc<OwnedFd>,
    file_name: OsString,
    path: PathBuf,
    shared: Arc<Shared>,
}

impl WatchHandle {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// An inotify descriptor (non-blocking, close-on-exec) that becomes readable whenever an
    /// entry of the lock directory is removed, renamed or created, or the directory itself goes:
    /// every way the path can stop naming our file. `fd` is a [`new_inotify`] instance (or the
    /// error making it).
    pub(crate) fn inotify(&self, fd: std::io::Result<OwnedFd>) -> std::io::Result<OwnedFd> {
        use rustix::fs::inotify::{self, WatchFlags};
        let fd = fd?;
        let flags = WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR;
        // Through our directory descriptor, not its path: the path may have been replaced.
        let dir = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        inotify::add_watch(&fd, dir.as_str(), flags)?;
        // And every directory holding a symlink on the way, so that a flipped
        // `current -> releases/vN` wakes us too (its path then leads to another file).
        for parent in symlink_parents(&self.path) {
            inotify::add_watch(&fd, parent.as_path(), flags)?;
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
                &fd,
                ancestor,
                WatchFlags::MOVE_SELF
                    | WatchFlags::DELETE_SELF
                    | WatchFlags::ONLYDIR
                    | WatchFlags::MASK_ADD,
            );
        }
        Ok(fd)
    }

    /// Is the path still our file? `None` when it is. Asked twice: of the name in the directory
    /// we opened, and of the whole path as given, re-resolved (its symlinks followed as they are
    /// now): a retargeted symlink on the way leads other copies to another file.
    pub(crate) fn check_path(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.path_as(dev, ino)
    }

    /// Does the name in the directory we opened still name our file? `None` when it does.
    pub(crate) fn check_in_dir(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.in_dir_as(dev, ino)
    }

    /// The (dev, ino) of the file the lock is on now.
    fn identity(&self) -> (u64, u64) {
        let now = self.shared.now();
        (now.dev, now.ino)
    }

    /// [`WatchHandle::check_path`] for the file (dev, ino).
    fn path_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        self.in_dir_as(dev, ino)
            .or_else(|| ours(rustix::fs::lstat(&self.path), dev, ino))
    }

    /// [`WatchHandle::check_in_dir`] for the file (dev, ino).
    fn in_dir_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
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

/// The lock's descriptor, for [`crate::InstanceGuard::lock_file_descriptor`]: a duplicate of it
/// shares the open file description, and with it the lock.
impl AsFd for HeldLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // The file the lock is on now: the newest (see `Files`).
        self.files.newest().as_fd()
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
    fn verify_held_as(&self, dev: u64, ino: u64) -> bool {
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
    /// as [`HeldLock::move_above`] does on acquisition. Serialised with the other watches and
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

/// Opening a lock file only to look at it: never following a symlink, never blocking on a FIFO,
/// never becoming a controlling terminal.
fn probe_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Err(e) = self.release_in_place() {
            tracing::warn!(error = %e, "releasing lock file failed");
        }
    }
}

/// Names file systems whose locks cannot be trusted to exclude (or may hang), by `statfs` magic.
pub(crate) fn network_fs_name(f_type: i64) -> Option<&'static str> {
    // Magic numbers from linux/magic.h and the file systems' own headers.
    Some(match f_type as u32 {
        0x6969 => "nfs",
        0x517B => "smb",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x564C => "ncp",
        0x0102_1997 => "9p",
        0x00C3_6400 => "ceph",
        0x5346_414F => "afs",
        0x6B41_4653 => "kafs",
        0x7375_7245 => "coda",
        0x0BD0_0BD0 => "lustre",
        0x4750_4653 => "gpfs",
        0x0116_1970 => "gfs2",
        0x7461_636F => "ocfs2",
        0x6573_5546 => "fuse",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_network_file_systems() {
        assert_eq!(network_fs_name(0x6969), Some("nfs"));
        assert_eq!(network_fs_name(0xFF53_4D42), Some("cifs"));
        assert_eq!(network_fs_name(0xFE53_4D42), Some("smb2"));
        assert_eq!(network_fs_name(0x517B), Some("smb"));
        assert_eq!(network_fs_name(0x00C3_6400), Some("ceph"));
        assert_eq!(network_fs_name(0x0102_1997), Some("9p"));
        assert_eq!(network_fs_name(0x6573_5546), Some("fuse"));
        // statfs reports f_type as a signed long: CIFS's magic arrives sign-extended.
        assert_eq!(network_fs_name(0xFF53_4D42_u32 as i32 as i64), Some("cifs"));
        // Local ones pass.
        for local in [
            0x0102_1994_i64, /* tmpfs */
            0xEF53,          /* ext4 */
            0x5846_5342,     /* xfs */
            0x9123_683E,     /* btrfs */
            0x794C_7630,     /* overlayfs */
        ] {
            assert_eq!(network_fs_name(local), None, "{local:#x}");
        }
    }

    fn private_plan(dir: &Path) -> LockPlan {
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

    /// A shorter re-write (here: the bus name dropped) never leaves the file anything but one
    /// whole record, even for a moment: it is padded, not followed by a truncation, so a holder
    /// killed in between leaves a file the next copy takes over.
    #[test]
    fn a_shorter_record_rewrite_leaves_one_whole_record() {
        let base = tempfile::tempdir().expect("tempdir");
        let plan = private_plan(&base.path().join("locks"));
        let mut dir = open_dir(&plan, false).expect("dir");
        let Attempt::Acquired(mut held, None) = lock(&plan, &mut dir, false).expect("lock") else {
            panic!("a fresh file is acquired, with no previous record");
        };
        let long = LockRecord::for_self(
            vec![crate::holder::BackendKind::LockFile],
            None,
            Some(format!(":1.{}", "9".repeat(200))),
        );
        let short = LockRecord {
            bus_unique_name: None,
            ..long.clone()
        };
        let path = plan.dir.join(&plan.file_name);
        for record in [&long, &short] {
            held.write_record(record).expect("write");
            let content = std::fs::read(&path).expect("read");
            assert_eq!(LockRecord::parse_whole(&content).as_ref(), Some(record));
            assert_eq!(content.len(), long.to_line().len());
        }
        held.release().expect("release");
        assert!(!path.exists(), "a file we created is removed");
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

    #[test]
    fn this_machines_tmp_is_local() {
        let fs = rustix::fs::statfs("/tmp").expect("statfs /tmp");
        assert_eq!(network_fs_name(fs.f_type as i64), None);
    }
}
