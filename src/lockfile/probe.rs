//! Probes for `status` and timeouts: who holds the lock file at a path, tested without ever
//! locking, creating or writing it.
//! Must not: take the lock, even for an instant (a copy starting then would believe it held).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::holder::Holder;
use crate::plan::LockPlan;

use super::dir::{check_dir, is_not_found, missing_directory, open_existing_dir};
use super::ofd::{is_held, is_locked_at_all};
use super::open::{file_type_name, is_ours, only_regular};
use super::open::{name_too_long, owner_acceptable, root_must_not_keep};
use super::reader::{look_at_record, read_holder, read_holder_async, unknown_holder};
use super::record::read_content;
use super::walk::{Walked, refuse_procfs_on_the_way, walk_dir};

/// Reads the current holder of `path` without locking anything (for `status` and timeouts).
pub(super) fn peek_holder(path: &Path) -> Option<Holder> {
    let file = open_to_look(path)?;
    Some(look_at_record(&file, path).unwrap_or_else(|| unknown_holder(path)))
}

/// Is the lock file at `path` held by no copy (no write lock on it) but locked all the same,
/// by readers alone, which keep every copy from locking it? False when that cannot be seen.
pub(super) fn kept_out_by_readers(path: &Path) -> bool {
    open_to_look(path)
        .is_some_and(|file| is_held(&file) == Ok(false) && is_locked_at_all(&file) == Ok(true))
}

/// The regular file at `path`, opened read-only to look at it; `None` when there is none.
/// Looked at before it is opened: anything but a regular file is never opened (see
/// `only_regular`); one swapped in after the look is refused after the open.
fn open_to_look(path: &Path) -> Option<OwnedFd> {
    only_regular(path, &rustix::fs::lstat(path).ok()?).ok()?;
    let file = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&file).ok()?;
    (FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then_some(file)
}

/// Refuses the way to `plan`'s lock directory as an acquisition would ([`walk_dir`]'s checks:
/// a symlink or a directory on the way that another user controls, a procfs link), so that a
/// look never says "not running" where `run` says "unsafe lock path". Creates and opens
/// nothing but what the walk opens to look; anything else the walk meets (a directory not
/// made yet) is left for the look at the file to say.
pub(crate) fn refuse_unsafe_way(plan: &LockPlan) -> Result<()> {
    let euid = rustix::process::geteuid().as_raw();
    match walk_dir(plan, euid) {
        Err(e @ (Error::UnsafeLockPath { .. } | Error::InvalidOption { .. })) => Err(e),
        // A directory missing that an acquisition would not make: the same refusal (64), not
        // "not running" (a review: `run` said 64 and `status` 3 for one path).
        Err(e) if is_not_found(&e) => missing_directory(plan).map_or(Ok(()), Err),
        Ok(Walked::Missing(..)) if plan.create_dir_mode.is_none() && !plan.service_dir => {
            missing_directory(plan).map_or(Ok(()), Err)
        }
        // The directory's own rules too (its owner, its mode), as an acquisition checks them: a
        // review saw `run` refuse a per-user directory made 0755 and `status` call it free.
        Ok(Walked::Found(_, st, _)) => check_dir(plan, &st, euid),
        _ => Ok(()),
    }
}

/// For a look that found nobody holding the lock file: refuses the file an acquisition would
/// refuse for its owner (one of another user's it could write, outside the directories where
/// that is expected), so that a look never says "not running" where `run` says "unsafe lock
/// path" (a review: another user's file given as the lock file). Anything else is left for the
/// acquisition to judge.
pub(crate) fn refuse_unheld_file(plan: &LockPlan) -> Result<()> {
    let euid = rustix::process::geteuid().as_raw();
    let Ok(dir) = open_existing_dir(plan, true) else {
        return Ok(());
    };
    let name = plan.file_name.as_os_str();
    let Ok(st) = rustix::fs::statat(&*dir.fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else {
        return Ok(());
    };
    let writable = rustix::fs::accessat(
        &*dir.fd,
        name,
        rustix::fs::Access::WRITE_OK,
        rustix::fs::AtFlags::EACCESS | rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .is_ok();
    if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && writable
        && !owner_acceptable(plan, euid, st.st_uid, &dir)
        && !root_must_not_keep(plan, euid, st.st_uid, &dir)
    {
        return Err(Error::UnsafeLockPath {
            path: plan.path(),
            problem: UnsafeLockPath::WrongOwner {
                owner: st.st_uid,
                expected: euid,
            },
        });
    }
    Ok(())
}

/// Who holds the lock file at `path`, by its record as it is now, with no grace: "unknown" when
/// it cannot be read or says nothing yet (for a wait that has run out).
pub(crate) fn holder_now(path: &Path) -> Holder {
    peek_holder(path).unwrap_or_else(|| unknown_holder(path))
}

/// Who holds the lock file at `path`, tested (`F_OFD_GETLK`) on a read-only descriptor: never
/// created, never written, never locked, so a copy starting at the same moment is not disturbed.
/// `None` when nobody holds it, or there is no such file. A holder whose record is not written
/// yet gets the short grace [`read_holder`] gives it.
///
/// A path an acquisition would refuse is refused here with the same error, never reported as
/// free: anything but a regular file (looked at before it is opened, and never opened:
/// see [`only_regular`]), and a file nobody holds that has more than one name, or that is not
/// a lock file (see [`is_ours`]). (An acquisition gives a second name a moment to go; this
/// look, made once, does not.) A held file is held, whatever it is: that is what an
/// acquisition says too ("already running").
///
/// This blocks for up to [`RECORD_GRACE`](super::reader::RECORD_GRACE): from async code use [`holder_of_async`].
///
/// `name` is the instance's, for the error that says this process may not look at the file.
pub(crate) fn holder_of(path: &Path, name: &str) -> Result<Option<Holder>> {
    Ok(held_file(path, name)?.map(|file| read_holder(&file, path)))
}

/// [`holder_of`] for async code: the grace is awaited, not blocked on.
pub(crate) async fn holder_of_async(path: &Path, name: &str) -> Result<Option<Holder>> {
    Ok(match held_file(path, name)? {
        Some(file) => Some(read_holder_async(&file, path).await),
        None => None,
    })
}

/// The file at `path`, opened read-only, when someone holds its lock.
fn held_file(path: &Path, name: &str) -> Result<Option<OwnedFd>> {
    let not_permitted = |e: Errno| Error::NotPermitted {
        name: name.to_owned(),
        reason: format!(
            "cannot open lock file {}: {}; run as its owner or choose another lock path",
            path.display(),
            std::io::Error::from(e)
        ),
        source: Some(Box::new(std::io::Error::from(e))),
    };
    refuse_procfs_on_the_way(path)?;
    match rustix::fs::lstat(path) {
        Ok(st) => only_regular(path, &st)?,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) if e == Errno::ACCESS || e == Errno::PERM => return Err(not_permitted(e)),
        // Only a lock file given can have a name that long (a derived one is bounded), as an
        // acquisition says it.
        Err(Errno::NAMETOOLONG) => return Err(name_too_long("lock_file", path)),
        Err(e) => return Err(Error::io("cannot stat lock file", path, e.into())),
    }
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
        // As an acquisition says it (a directory or file of another user's): not an
        // internal error, and the same answer as `run` gives.
        Err(e) if e == Errno::ACCESS || e == Errno::PERM => return Err(not_permitted(e)),
        Err(e) => return Err(Error::io("cannot open lock file", path, e.into())),
    };
    // Checked again on what was opened: the path may have been given another file after the
    // look.
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
        Ok(true) => return Ok(Some(file)),
        Ok(false) => {}
        Err(e) => return Err(Error::io("cannot test the lock on", path, e.into())),
    }
    // Nobody holds it: free only if an acquisition would take it, in the order it checks.
    #[allow(clippy::unnecessary_cast)] // `st_nlink` is narrower on some architectures
    let links = st.st_nlink as u64;
    if links > 1 {
        return Err(Error::UnsafeLockPath {
            path: path.to_owned(),
            problem: UnsafeLockPath::HardLinked { links },
        });
    }
    let content =
        read_content(&file).map_err(|e| Error::io("cannot read the lock file", path, e.into()))?;
    if links == 1 && !is_ours(&content) {
        // Read as a copy took the file and wrote into it, it may have been torn (a longer
        // record over a shorter one, the size not yet updated): looked at once more.
        if is_held(&file) == Ok(true) {
            return Ok(Some(file));
        }
        let gone = rustix::fs::fstat(&file).is_ok_and(|now| now.st_nlink == 0);
        let again = read_content(&file)
            .map_err(|e| Error::io("cannot read the lock file", path, e.into()))?;
        if !gone && !is_ours(&again) {
            return Err(Error::NotALockFile {
                name: name.to_owned(),
                path: path.to_owned(),
            });
        }
    }
    Ok(None)
}

/// The lock file of `plan`'s name in the *other* system directory, when someone holds it: a
/// copy there does not meet ours at our file. A name whose deployment made it a directory of
/// its own (`/run/unique-instance/NAME`) is planned there, in the shared directory otherwise;
/// a copy that planned before the directory was made, or after it was removed, is in the other
/// one. So each side, holding its own file, also looks at the other's: whichever looks second
/// sees the first (a file gets its name only once it is locked, see `create_unnamed`),
/// and never do two copies both run.
///
/// In the shared directory a file is believed only when it is root's or the service
/// directory's owner's, and has one name: that directory is writable by everyone, and a local
/// user's file there must not keep the service from running (the squatting its own directory
/// closes). Anything unexpected at either path is not a holder (an acquisition there would
/// refuse it; here it is not ours to judge). The file found, read-only, and its path.
pub(crate) fn copy_in_the_other_dir(plan: &LockPlan) -> Option<(OwnedFd, PathBuf)> {
    let (path, trusted) = if plan.service_dir {
        let owner = rustix::fs::stat(&plan.dir).ok()?.st_uid;
        (
            Path::new(crate::SYSTEM_LOCK_DIR).join(&plan.file_name),
            Some([0, owner]),
        )
    } else if plan.shared_system_dir {
        (
            Path::new(crate::plan::SERVICE_LOCK_BASE)
                .join(&plan.instance)
                .join(&plan.file_name),
            None,
        )
    } else {
        return None;
    };
    let believed = |st: &rustix::fs::Stat| {
        FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && st.st_nlink == 1
            && trusted.is_none_or(|t| t.contains(&st.st_uid))
    };
    if !believed(&rustix::fs::lstat(&path).ok()?) {
        return None;
    }
    let file = rustix::fs::open(
        &path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .ok()?;
    if !believed(&rustix::fs::fstat(&file).ok()?) || !is_held(&file).ok()? {
        return None;
    }
    Some((file, path))
}

/// [`copy_in_the_other_dir`], with its holder read (the grace awaited).
pub(crate) async fn copy_in_the_other_dir_async(plan: &LockPlan) -> Option<Holder> {
    let (file, path) = copy_in_the_other_dir(plan)?;
    Some(read_holder_async(&file, &path).await)
}

/// [`copy_in_the_other_dir`], with its holder read (the grace blocked on).
pub(crate) fn copy_in_the_other_dir_blocking(plan: &LockPlan) -> Option<Holder> {
    let (file, path) = copy_in_the_other_dir(plan)?;
    Some(read_holder(&file, &path))
}

/// How often [`until_the_other_dir_is_free`] looks again: this wait is for a copy left from
/// before a deployment, once, not a take-over path worth events.
const OTHER_DIR_RECHECK: Duration = Duration::from_millis(100);

/// Waits until nobody holds the lock file in the other directory (see
/// [`copy_in_the_other_dir`]), looked at by its path each time (a copy that queued there takes
/// a new file when the first leaves), or until `deadline`: `false` then.
pub(crate) async fn until_the_other_dir_is_free(
    plan: &LockPlan,
    deadline: Option<Instant>,
) -> bool {
    loop {
        if copy_in_the_other_dir(plan).is_none() {
            return true;
        }
        match deadline {
            Some(d) if Instant::now() + OTHER_DIR_RECHECK > d => {
                tokio::time::sleep_until(d.into()).await;
                return copy_in_the_other_dir(plan).is_none();
            }
            _ => tokio::time::sleep(OTHER_DIR_RECHECK).await,
        }
    }
}
