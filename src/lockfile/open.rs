//! Opening the lock file: created with `O_EXCL` or opened as it is, first only for reading, and
//! written only when it is a lock file of ours (a regular file, one name, an acceptable owner,
//! empty or one holder record).
//! Must not: lock the file (`attempt.rs`), nor ever write or remove a file that is not ours.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::plan::LockPlan;
use crate::test_hooks::{self, Hook};

use super::dir::{LockDir, not_permitted};
use super::ofd::{is_held, lock_exclusive, read_lock, retry_eintr};
use super::record::{LockRecord, placeholder, read_content, write_or_unknown};

/// A lock file, opened.
pub(super) enum Opened {
    /// Ours to lock and write; `true` when this call created it (`O_CREAT | O_EXCL`).
    Writable(OwnedFd, bool),
    /// A file opened only for reading: enough to learn whether (and by whom) it is held, tested
    /// without being taken (`F_OFD_GETLK`), but not to become the instance.
    ReadOnly(OwnedFd, ReadOnlyBecause),
    /// A file nobody holds that has this many names (hard links): it may be another file in
    /// disguise, not ours to write while it has them. Opened only for reading; the attempt
    /// gives the other names a moment to go (`attempt.rs`). (Held, it is `ReadOnly(.., Held)`:
    /// naming its holder only reads it, which is safe whatever its names.)
    Linked(OwnedFd, u64),
}

/// How many names a file at the lock path has.
enum Names {
    /// None any more: its holder removed it between our open and the check (it does so on
    /// every release). A race to retry, not an attack: the path names a fresh file, or nothing.
    Gone,
    One,
    /// More than one: a second name may mean someone else's file linked in here (say
    /// /etc/shadow, where `protected_hardlinks` is off), which we would truncate and write.
    More(u64),
}

/// Why a lock file was opened only for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadOnlyBecause {
    /// Another user's file that this user may not write.
    NoWritePermission,
    /// Neither empty nor a whole holder record: someone else's data, never ours to write or
    /// remove.
    NotOurs,
    /// Found held (tested, not taken) by a copy that will not wait, or found held with more than
    /// one name (see [`Opened::Linked`]): already running.
    Held,
}

/// Whether `content` (the start of a file at the lock path, see [`read_content`]) may be used as
/// a lock file: empty (just created, a holder's that died before writing its record, or a
/// user's own, which is used but never written into nor removed) or one holder record and nothing else (a crashed holder's, see
/// [`LockRecord::parse_whole`]). Anything else is someone's data, which unique-instance never
/// writes into or removes.
pub(super) fn is_ours(content: &[u8]) -> bool {
    content.is_empty() || LockRecord::parse_whole(content).is_some()
}

/// The refusal of a lock file's path too long to open (`ENAMETOOLONG`), given as `option`.
pub(super) fn name_too_long(option: &'static str, path: &Path) -> Error {
    Error::InvalidOption {
        option,
        value: path.to_owned(),
        reason: "the lock file's path, or a name in it, is too long; choose a shorter one".into(),
    }
}

pub(super) fn not_a_lock_file(plan: &LockPlan, path: &Path) -> Error {
    Error::NotALockFile {
        name: plan.instance.clone(),
        path: path.to_owned(),
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
pub(super) fn open_lock_file(
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
    // Only a regular file is ever opened (see [`only_regular`]); NONBLOCK still keeps a FIFO
    // swapped in after the look from blocking the open, and it is refused below.
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
    let look = || {
        retry_eintr(|| {
            rustix::fs::statat(dir, plan.file_name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
        })
    };
    let refused = |e: Errno| match e {
        Errno::LOOP => unsafe_path(UnsafeLockPath::Symlink),
        Errno::ISDIR => unsafe_path(UnsafeLockPath::NotRegularFile { kind: "directory" }),
        // A socket, or a device with no driver behind it (`/dev/tty` without a controlling
        // terminal), swapped in after the look: named for what it is.
        Errno::NXIO => look()
            .ok()
            .and_then(|st| only_regular(path, &st).err())
            .unwrap_or_else(|| {
                unsafe_path(UnsafeLockPath::NotRegularFile {
                    kind: "special file",
                })
            }),
        Errno::ROFS => not_permitted(
            plan,
            format!(
                "cannot create lock file {}: it is on a read-only file system; choose a lock \
                 path on a writable one",
                path.display()
            ),
            Errno::ROFS,
        ),
        e if e == Errno::ACCESS || e == Errno::PERM => not_permitted(
            plan,
            format!(
                "cannot open lock file {}: {}; run as its owner or choose another lock path",
                path.display(),
                std::io::Error::from(e)
            ),
            e,
        ),
        // A name too long to be a file (a lock file given, or a lock directory's path that
        // leaves no room for the file's name): a path to choose again, not an internal error.
        Errno::NAMETOOLONG if plan.create_dir_mode.is_none() && !plan.service_dir => {
            name_too_long("lock_file", path)
        }
        Errno::NAMETOOLONG => name_too_long("lock_dir", path),
        e => Error::io("cannot open lock file", path, e.into()),
    };
    let fstat = |file: &OwnedFd| {
        rustix::fs::fstat(file).map_err(|e| Error::io("cannot stat", path, e.into()))
    };
    // What every file at the path must be, and how many names it has. Checked on the opened
    // descriptor, though the path was looked at before the open: it may have been given another
    // file in between, and this refuses that one.
    let check = |st: &Stat| -> Result<Names> {
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != FileType::RegularFile {
            return Err(unsafe_path(UnsafeLockPath::NotRegularFile {
                kind: file_type_name(file_type),
            }));
        }
        #[allow(clippy::unnecessary_cast)] // `st_nlink` is narrower on some architectures
        Ok(match st.st_nlink as u64 {
            0 => Names::Gone,
            1 => Names::One,
            links => Names::More(links),
        })
    };
    let writable = |file: OwnedFd, st: Stat, created: bool| -> Result<Option<(Opened, Stat)>> {
        match check(&st)? {
            Names::Gone => return Ok(None),
            // A second name for a file we have just made: nobody's accident.
            Names::More(links) if created => {
                return Err(unsafe_path(UnsafeLockPath::HardLinked { links }));
            }
            Names::More(links) => return Ok(Some((Opened::Linked(file, links), st))),
            Names::One => {}
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
    //
    // Made under a temporary name first, given its owner, mode and lock, and only then its
    // name (see `create_unnamed`): another user's copy (or ours under a umask like 0277) never
    // meets it with the mode the umask left, which it may not open (a false "not permitted").
    let made = create_unnamed(
        dir,
        plan.file_name.as_os_str(),
        plan.file_mode,
        |file, st| new_lock_file(plan, file, path, st, euid, lock_dir),
    )?;
    let exists = match made {
        Made::Named(file) => {
            let st = fstat(&file)?;
            return writable(file, st, true);
        }
        Made::Exists => true,
        Made::Unsupported => false,
    };
    // Where it cannot (or the file could not be renamed to its name), created at its name, then
    // given its owner and mode.
    if !exists {
        match open(flags | OFlags::RDWR | OFlags::CREATE | OFlags::EXCL) {
            Ok(file) => {
                let mut st = fstat(&file)?;
                // Its first record only once it is locked (see `lock_step`): unlocked at its
                // name, another copy may take it first, and a record written now would land
                // over that copy's (a review).
                set_new_file_owner_and_mode(plan, &file, path, &mut st, euid, lock_dir)?;
                return writable(file, st, true);
            }
            Err(Errno::EXIST) => {}
            // The directory was removed (nothing can be created in it): see `lock_step`. Unless
            // it is still there: then its file system makes no files.
            Err(Errno::NOENT) if fstat(dir).is_ok_and(|st| st.st_nlink > 0) => {
                return Err(super::dir::makes_no_files(plan));
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(refused(e)),
        }
    }
    // Something is there: looked at first, and opened only if it is a regular file.
    match look() {
        Ok(st) => only_regular(path, &st)?,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(refused(e)),
    }
    let file = match open(flags | OFlags::RDONLY) {
        Ok(file) => file,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(refused(e)),
    };
    let st = fstat(&file)?;
    match check(&st)? {
        Names::Gone => return Ok(None),
        Names::More(_) if is_held(&file) == Ok(true) => {
            return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::Held), st)));
        }
        Names::More(links) => return Ok(Some((Opened::Linked(file, links), st))),
        Names::One => {}
    }
    let content =
        read_content(&file).map_err(|e| Error::io("cannot read the lock file", path, e.into()))?;
    if !is_ours(&content) {
        test_hooks::stop_at(Hook::AfterReadingForeignContent);
        return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::NotOurs), st)));
    }
    // Held, and we will not wait: already running, learnt without opening it for writing.
    if !block && is_held(&file) == Ok(true) {
        return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::Held), st)));
    }
    if root_must_not_keep(plan, euid, st.st_uid, lock_dir) {
        // Held: its holder removes it when it lets go (a wait waits for that), and then we
        // make our own. Read-locked only, it is removed all the same (see `remove_unheld`).
        if is_held(&file) == Ok(true) {
            return Ok(Some((Opened::ReadOnly(file, ReadOnlyBecause::Held), st)));
        }
        // A lock file given by its path (`--lock-file /tmp/flag`) that is a user's own file is
        // theirs: never removed (a review saw root delete a user's empty file so). Only a
        // record of ours that says the file is ours to remove lets it go. (In a lock directory,
        // a file at the name a copy derives is one put there to squat.)
        let ours_to_remove = LockRecord::parse_whole(&content).is_some_and(|record| !record.keep);
        if plan.file_given() && !ours_to_remove {
            return Err(unsafe_path(UnsafeLockPath::WrongOwner {
                owner: st.st_uid,
                expected: 0,
            }));
        }
        if still_names(look(), &st) {
            remove_foreign(plan, dir, path, &st, open(flags | OFlags::RDWR))?;
        }
        return Ok(None);
    }
    // Opened again only while the path still names the file checked: another one (a FIFO,
    // whose writer an `O_RDWR` open would release) is never opened. It may still be swapped in
    // after this look; the `fstat` below refuses it then.
    if !still_names(look(), &st) {
        return Ok(None);
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

/// What [`create_unnamed`] made.
pub(super) enum Made {
    /// The new file, with its name now (one), prepared before it had it.
    Named(OwnedFd),
    /// Something already has the name: the new file is removed, never seen by anyone.
    Exists,
    /// No file could be made under a name of its own first, or it could not be given the name
    /// (`RENAME_NOREPLACE` not supported by this file system, no room, not permitted): create it
    /// at its name instead, as before.
    Unsupported,
}

/// Tells the temporary names of one process apart.
static TEMPORARY_NAMES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many taken temporary names [`create_unnamed`] tries past before it gives up on them.
pub(super) const MAX_TEMPORARY_TRIES: u32 = 16;

/// `.unique-instance.PID.N.R.new`: `N` tells one process's names apart, and `R` is random, so
/// that nobody can plant files at the names a copy will use (a review planted one for every
/// PID in a shared directory) and none is met again after a process killed mid-creation left
/// one and its PID came back.
pub(super) fn temporary_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Seeded from the system's randomness once per thread, and different each time.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!(
        ".unique-instance.{}.{}.{random:016x}.new",
        std::process::id(),
        TEMPORARY_NAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Makes a new file in `dir` under a temporary name of its own (see [`temporary_name`]: a
/// name no copy looks at), runs `prepare` on it (its owner and mode, and whatever else must be
/// true before anyone can open it), locks it (OFD, exclusive), and only then renames it to
/// `name` (`RENAME_NOREPLACE`), which fails if anything has that name already: so no other
/// process ever meets the file at `name` as it was before `prepare` (with the mode the umask
/// left: 0600 under `umask 077`, which another user's copy may not open, and takes for a
/// refusal), nor unlocked (a file another user may not write, held by nobody, is one that user
/// is refused).
///
/// A rename, not an unnamed file (`O_TMPFILE`) linked at its name: the descriptor of a linked
/// `O_TMPFILE` keeps its anonymous name, so `/proc/PID/fd` and `lsof` would show the lock
/// file as "/dir/#12345 (deleted)" for as long as it is held. A rename moves the name the
/// descriptor was opened by. An error of `prepare` is returned as it is, the temporary file
/// removed; only a process killed between the create and the rename (microseconds) leaves one
/// behind.
pub(super) fn create_unnamed(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    mode: u32,
    prepare: impl FnOnce(&OwnedFd, &mut Stat) -> Result<()>,
) -> Result<Made> {
    let Some((file, temporary)) = make_temporary(dir, mode, prepare)? else {
        return Ok(Made::Unsupported);
    };
    let renamed = rustix::fs::renameat_with(
        dir,
        temporary.as_str(),
        dir,
        name,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    Ok(match renamed {
        Ok(()) => Made::Named(file),
        Err(Errno::EXIST) => {
            remove_temporary(dir, &temporary);
            Made::Exists
        }
        Err(_) => {
            remove_temporary(dir, &temporary);
            Made::Unsupported
        }
    })
}

/// The first half of [`create_unnamed`]: a new file under a temporary name, prepared and
/// locked; `None` where that cannot be done here.
fn make_temporary(
    dir: &OwnedFd,
    mode: u32,
    prepare: impl FnOnce(&OwnedFd, &mut Stat) -> Result<()>,
) -> Result<Option<(OwnedFd, String)>> {
    let mut tries = 0;
    let (file, temporary) = loop {
        let temporary = temporary_name();
        match retry_eintr(|| {
            rustix::fs::openat(
                dir,
                temporary.as_str(),
                OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::RDWR
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY
                    | OFlags::NONBLOCK,
                // No access for anyone until it is locked, then `mode`: a file anyone may read
                // can be read-locked by them the moment it is made, and then never locked by us
                // (a review read-locked every new file so).
                Mode::empty(),
            )
        }) {
            Ok(file) => break (file, temporary),
            // Taken (a leftover, or planted by someone who guessed it): another name.
            Err(Errno::EXIST) if tries < MAX_TEMPORARY_TRIES => tries += 1,
            // Anything else (the directory removed, no room, not permitted): the open at the
            // name finds it and says it.
            Err(_) => return Ok(None),
        }
    };
    // Locked before it has its name, so nobody ever finds it unlocked there: a copy that may
    // not write it (another user's) would otherwise be told it may not hold it, though it is
    // being taken. The lock belongs to this open file description; the caller's lock on it is
    // then a no-op. (A file system without locks: made at its name instead, and refused there.)
    if lock_exclusive(&file, false).is_err()
        || rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).is_err()
    {
        remove_temporary(dir, &temporary);
        return Ok(None);
    }
    let Ok(mut st) = rustix::fs::fstat(&file) else {
        remove_temporary(dir, &temporary);
        return Ok(None);
    };
    if let Err(e) = prepare(&file, &mut st) {
        remove_temporary(dir, &temporary);
        return Err(e);
    }
    Ok(Some((file, temporary)))
}

fn remove_temporary(dir: &OwnedFd, temporary: &str) {
    let _ = rustix::fs::unlinkat(dir, temporary, AtFlags::empty());
}

/// What [`remove_unheld`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// Removed: nobody held it as it went.
    Removed,
    /// A copy holds it: left.
    Held,
    /// The path names another file now, or none: left (the caller looks again).
    Moved,
    /// Another process holds the lock directory's `flock` (another remover, at length, or
    /// someone keeping removers out): left.
    Contended,
}

/// How long [`remove_unheld`] waits for another remover's `flock` on the lock directory.
const REMOVER_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Removes `st`, a lock file no copy holds, open as `file` (for reading and writing) in `dir`,
/// only while that is so and the path still names it. Kept from every copy as it goes: by our
/// write lock when one can be had, which also keeps out any other remover; else, when only
/// read locks are in the way (anyone who may read a file can take one: a squatter), by a read
/// lock of ours, which no copy can take a write lock past, together with [`one_remover`],
/// which keeps removers one at a time: two that both read-locked the file must not
/// both remove it by its name, the second then removing a file a copy made since (a review
/// found a copy's just-taken file removed so, by an earlier design).
pub(super) fn remove_unheld(
    plan: &LockPlan,
    dir: &OwnedFd,
    file: &OwnedFd,
    st: &Stat,
) -> rustix::io::Result<Removal> {
    let name = plan.file_name.as_os_str();
    let _one_remover = match lock_exclusive(file, false) {
        Ok(()) => None,
        Err(Errno::AGAIN | Errno::ACCESS) => {
            if !read_lock(file)? {
                return Ok(Removal::Held);
            }
            match one_remover(dir)? {
                Some(remover) => Some(remover),
                None => return Ok(Removal::Contended),
            }
        }
        Err(e) => return Err(e),
    };
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(now) if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) => {}
        Ok(_) | Err(Errno::NOENT) => return Ok(Removal::Moved),
        Err(e) => return Err(e),
    }
    test_hooks::stop_at(Hook::BeforeUnlinkingUnheld);
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(Removal::Removed),
        Err(e) => Err(e),
    }
}

/// The file whose lock keeps removers one at a time in a directory nobody but its owner (and
/// root) may write: see [`one_remover`].
const REMOVER_FILE: &str = ".unique-instance.remover";

/// Keeps removers in `dir` one at a time (see [`remove_unheld`]) until the descriptor returned
/// is dropped, waiting up to [`REMOVER_WAIT`]; `None` when that cannot be had by then.
///
/// Chosen from the directory alone, so that every copy meeting one file uses the same lock,
/// whether it named the file by its lock directory or by its path (a review had two removers
/// run at once, one on each kind of lock, and two copies). In a directory that only its owner
/// (and its group, where the group may write it) may write, by a write lock on
/// [`REMOVER_FILE`] in it, which no other user may open, so none can hold it (a review kept a
/// deployed service from starting after a crash by holding the directory's `flock` with a read
/// lock on the file left behind). It is made as a lock file is: under a temporary name, given
/// its mode (0600, or 0660 where the group shares the directory, whatever the umask), its
/// owner (the directory's, when root makes it) and group (the directory's, where the group
/// shares it), locked, and only then named; one found there is taken only as it would have
/// been made (a regular file of the directory's owner, root or, where the group shares the
/// directory, its group; no access for others), and never changed (a review had root give a
/// hard link to a file of its own to the directory's owner). In a directory others may write
/// (a shared sticky one, where anyone could make that file first, as they can the lock file),
/// by the directory's `flock`, which anyone who may read the directory can hold as well.
fn one_remover(dir: &OwnedFd) -> rustix::io::Result<Option<OwnedFd>> {
    let dir_st = rustix::fs::fstat(dir)?;
    if dir_st.st_mode & 0o002 != 0 {
        return flock_dir(dir);
    }
    let group_shared = dir_st.st_mode & 0o020 != 0;
    let open_found = || {
        retry_eintr(|| {
            rustix::fs::openat(
                dir,
                REMOVER_FILE,
                OFlags::RDWR
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY
                    | OFlags::NONBLOCK,
                Mode::empty(),
            )
        })
    };
    // Not ours to open (root's, a user's), or not a file at all (a symlink, a directory): not
    // had. Only who may write the directory could have put it there.
    let refused = |e: Errno| match e {
        Errno::ACCESS | Errno::PERM | Errno::LOOP | Errno::ISDIR | Errno::NXIO => Ok(None),
        e => Err(e),
    };
    let file = match open_found() {
        Ok(file) => file,
        Err(Errno::NOENT) => {
            let mode = if group_shared { 0o660 } else { 0o600 };
            let give = |file: &OwnedFd, _: &mut Stat| -> Result<()> {
                let (uid, gid) = (
                    rustix::process::Uid::from_raw(dir_st.st_uid),
                    rustix::process::Gid::from_raw(dir_st.st_gid),
                );
                let owner = rustix::process::geteuid().is_root().then_some(uid);
                if owner.is_some() || group_shared {
                    rustix::fs::fchown(file, owner, group_shared.then_some(gid)).map_err(|e| {
                        Error::io("cannot give away", Path::new(REMOVER_FILE), e.into())
                    })?;
                }
                Ok(())
            };
            match create_unnamed(dir, std::ffi::OsStr::new(REMOVER_FILE), mode, give) {
                // Made, and locked by us before it had its name.
                Ok(Made::Named(file)) => return Ok(Some(file)),
                Ok(Made::Exists) => match open_found() {
                    Ok(file) => file,
                    Err(e) => return refused(e),
                },
                // Not made now (no room, no inode, not permitted): not had, never the
                // directory's `flock` instead, which a copy that made the file would not
                // exclude (a review had two removers, one on each, and two copies). Where no
                // file can be named by a rename at all, made at its name.
                Ok(Made::Unsupported) => match make_at_its_name(dir, mode, give) {
                    Some(file) => file,
                    None => return Ok(None),
                },
                Err(_) => return Ok(None),
            }
        }
        Err(e) => return refused(e),
    };
    let st = rustix::fs::fstat(&file)?;
    let owner_ok = st.st_uid == dir_st.st_uid
        || st.st_uid == 0
        || (group_shared && st.st_gid == dir_st.st_gid);
    let others = if group_shared { 0o007 } else { 0o077 };
    // Its number of names does not matter: it is never written nor changed, and a name
    // elsewhere gives no access to it (a review kept copies out for good with one hard link).
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
        || !owner_ok
        || st.st_mode & others != 0
    {
        return Ok(None);
    }
    let until = std::time::Instant::now() + REMOVER_WAIT;
    loop {
        match lock_exclusive(&file, false) {
            Ok(()) => return Ok(Some(file)),
            Err(Errno::AGAIN | Errno::ACCESS) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(Errno::AGAIN | Errno::ACCESS) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// [`REMOVER_FILE`] made at its name (`O_EXCL`), given `mode` and what `give` gives it, where it
/// cannot be made under another name first; `None` when it cannot be made.
fn make_at_its_name(
    dir: &OwnedFd,
    mode: u32,
    give: impl FnOnce(&OwnedFd, &mut Stat) -> Result<()>,
) -> Option<OwnedFd> {
    let file = retry_eintr(|| {
        rustix::fs::openat(
            dir,
            REMOVER_FILE,
            OFlags::RDWR
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC
                | OFlags::NOCTTY
                | OFlags::NONBLOCK,
            Mode::empty(),
        )
    })
    .ok()?;
    let mut st = rustix::fs::fstat(&file).ok()?;
    let made = rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).is_ok()
        && give(&file, &mut st).is_ok()
        && lock_exclusive(&file, false).is_ok();
    if !made {
        // Ours, just made, and unusable: not left to refuse every later removal.
        let _ = rustix::fs::unlinkat(dir, REMOVER_FILE, AtFlags::empty());
    }
    made.then_some(file)
}

/// An exclusive `flock` on the directory `dir` (on a descriptor of its own, which holds it
/// until dropped), waited for up to [`REMOVER_WAIT`]; `None` when it is not had by then.
fn flock_dir(dir: &OwnedFd) -> rustix::io::Result<Option<OwnedFd>> {
    let own = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let until = std::time::Instant::now() + REMOVER_WAIT;
    loop {
        match rustix::fs::flock(&own, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(own)),
            Err(Errno::WOULDBLOCK) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(Errno::WOULDBLOCK) => return Ok(None),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// What a lock file we just made gets before anyone may lock it: its owner and mode (see
/// [`set_new_file_owner_and_mode`]) and a first record (see [`placeholder`]).
pub(super) fn new_lock_file(
    plan: &LockPlan,
    file: &OwnedFd,
    path: &Path,
    st: &mut Stat,
    euid: u32,
    lock_dir: &LockDir,
) -> Result<()> {
    set_new_file_owner_and_mode(plan, file, path, st, euid, lock_dir)?;
    write_or_unknown(file, &placeholder(0), path)
        .map_err(|e| Error::io("cannot write holder record to", path, e))?;
    Ok(())
}

/// Gives a lock file we just created its intended mode, whatever the umask (under `umask 077`
/// a system lock file would be 0600, and other users could no longer see who runs), and, when
/// root creates it in a service's own directory, the service's user as owner, so that the
/// service can still take it if root's copy dies without removing it. Costs nothing when the
/// umask left the mode as asked (the `fstat` is made anyway).
pub(super) fn set_new_file_owner_and_mode(
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
/// lock file a copy started by root must meet; root never keeps such a file, though (see
/// [`root_must_not_keep`]). Likewise, for root, the file of a per-service directory's owner
/// (the service's user): only they and root can write that directory, and root gives the files
/// it creates there to that user. Elsewhere a foreign file is refused, because its owner, not
/// the directory's, decides what it is.
pub(super) fn owner_acceptable(plan: &LockPlan, euid: u32, owner: u32, lock_dir: &LockDir) -> bool {
    owner == euid
        || (plan.root_may_own
            && (owner == 0
                || (euid == 0
                    && (lock_dir.shared_sticky || lock_dir.service_owner == Some(owner)))))
}

/// Whether this is root meeting another user's file in a shared sticky directory (not the
/// service's user of a per-service directory): a file anyone could have put there. Held, it is
/// "already running". Held by nobody — planted, or left by a crashed service — root must not
/// lock it and keep it: it would stay its owner's, who could rewrite root's record in it or
/// rename it away (the sticky bit lets the owner), and a third copy would then run beside
/// root's. So root removes it, while holding its lock, and creates its own (`O_CREAT |
/// O_EXCL`), which that user can neither write nor move.
pub(super) fn root_must_not_keep(
    plan: &LockPlan,
    euid: u32,
    owner: u32,
    lock_dir: &LockDir,
) -> bool {
    euid == 0
        && owner != 0
        && plan.root_may_own
        && lock_dir.shared_sticky
        && lock_dir.service_owner != Some(owner)
}

/// Removes `st`, another user's lock file that no copy holds (see [`root_must_not_keep`]),
/// opened again for writing as `rw`, as [`remove_unheld`] does. Whatever happens meanwhile (it
/// vanished, was replaced, or a copy locked it first), the caller opens the path again.
fn remove_foreign(
    plan: &LockPlan,
    dir: &OwnedFd,
    path: &Path,
    st: &Stat,
    rw: rustix::io::Result<OwnedFd>,
) -> Result<()> {
    let rw = match rw {
        Ok(rw) => rw,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(Error::io("cannot open lock file", path, e.into())),
    };
    match rustix::fs::fstat(&rw) {
        Ok(now) if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) => {}
        Ok(_) => return Ok(()),
        Err(e) => return Err(Error::io("cannot stat", path, e.into())),
    }
    // Made root's first: in a sticky directory its owner may rename it, and one who did so
    // between the look at the path and the unlink by name would have root remove whatever is
    // at the path by then, another copy's file just made and held (a review: two copies ran).
    // Given back to its owner unless it goes.
    // Without the capability to (a unit that drops CAP_CHOWN), the removal is not safe: said,
    // and the file left to its owner.
    match rustix::fs::fchown(
        &rw,
        Some(rustix::process::Uid::ROOT),
        Some(rustix::process::Gid::ROOT),
    ) {
        Ok(()) => {}
        Err(e @ Errno::PERM) => {
            return Err(not_permitted(
                plan,
                format!(
                    "lock file {} is another user's (uid {}) and held by no copy; root removes \
                     such a file only once it is root's, and cannot make it so here \
                     (CAP_CHOWN): remove it, or give the program that capability",
                    path.display(),
                    st.st_uid
                ),
                e,
            ));
        }
        Err(e) => return Err(Error::io("cannot take over lock file", path, e.into())),
    }
    let removal = remove_unheld(plan, dir, &rw, st);
    if !matches!(removal, Ok(Removal::Removed)) {
        let owner = (
            rustix::process::Uid::from_raw(st.st_uid),
            rustix::process::Gid::from_raw(st.st_gid),
        );
        if let Err(e) = rustix::fs::fchown(&rw, Some(owner.0), Some(owner.1)) {
            tracing::warn!(path = %path.display(), error = %std::io::Error::from(e),
                "cannot give another user's lock file back to its owner");
        }
    }
    match removal {
        Ok(Removal::Removed) => {
            tracing::info!(path = %path.display(), owner = st.st_uid,
                "removed another user's lock file that no copy held from the shared directory, to make root's own");
            Ok(())
        }
        Ok(Removal::Held | Removal::Moved) => Ok(()),
        Ok(Removal::Contended) => Err(read_locked(plan, path)),
        Err(e) => Err(Error::io("cannot remove lock file", path, e.into())),
    }
}

/// The refusal of a lock file that no copy holds but that cannot be taken or put aside now:
/// read-locked by a process that is not a copy (anyone who may read it can), and either not a
/// file a copy ever removes (a user's own file given as the lock file) or kept from removal.
pub(crate) fn read_locked(plan: &LockPlan, path: &Path) -> Error {
    Error::NoUsableBackend {
        name: plan.instance.clone(),
        reason: format!(
            "lock file {} is held by no copy, but another process keeps it read-locked, so no \
             copy can lock it, and it cannot be removed now (it is a file copies never remove, \
             or the lock that keeps removers one at a time is held: the directory's flock, or \
             its .unique-instance.remover, which is also refused when it is not one a copy \
             made (then remove it)); find those processes (`fuser {} {}`), or remove the lock \
             file, or wait for it (--wait)",
            path.display(),
            path.display(),
            path.parent().unwrap_or(path).display()
        ),
        source: None,
    }
}

/// Refuses anything at the lock path but a regular file, from a look at it (`statat` with
/// `AT_SYMLINK_NOFOLLOW` from the lock directory, or `lstat`) made *before* it is opened, with
/// the errors the checks after the open give: a symbolic link, or what else it is. Opening it
/// would not be harmless: opening a FIFO's read end, even `O_NONBLOCK` and closed at once,
/// releases a writer blocked in its `open`, which then dies of SIGPIPE with its data lost; and
/// opening a device may make its driver act (arm a watchdog, raise a serial line's DTR). The
/// path may still be given another file between the look and the open: the checks on the
/// opened descriptor refuse that one.
pub(super) fn only_regular(path: &Path, st: &Stat) -> Result<()> {
    let problem = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => return Ok(()),
        FileType::Symlink => UnsafeLockPath::Symlink,
        other => UnsafeLockPath::NotRegularFile {
            kind: file_type_name(other),
        },
    };
    Err(Error::UnsafeLockPath {
        path: path.to_owned(),
        problem,
    })
}

/// Whether a look at the lock path (`statat`) found the file `st` there still.
pub(super) fn still_names(look: rustix::io::Result<Stat>, st: &Stat) -> bool {
    look.is_ok_and(|now| (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino))
}

pub(super) fn file_type_name(t: FileType) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Files planted at the temporary names a copy would use (any local user can make them in a
    /// shared sticky directory) do not stop it making its file: a review planted one for every
    /// PID, and copies made their file at its name with the umask's mode instead, which another
    /// user's copy took for a refusal (77).
    #[test]
    fn planted_temporary_names_do_not_stop_a_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let next = TEMPORARY_NAMES.load(std::sync::atomic::Ordering::Relaxed);
        for n in next..next + 1000 {
            let planted = format!(".unique-instance.{}.{n}.new", std::process::id());
            std::fs::write(dir.path().join(planted), "").expect("plant");
        }
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open the directory");
        let made = create_unnamed(&fd, std::ffi::OsStr::new("x.lock"), 0o644, |_, _| Ok(()))
            .expect("create");
        assert!(
            matches!(made, Made::Named(_)),
            "not made under a name of its own"
        );
        let st = std::fs::metadata(dir.path().join("x.lock")).expect("x.lock");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o777,
            0o644
        );
    }
}
