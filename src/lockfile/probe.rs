//! Probes for `status` and timeouts: who holds the lock file at a path, tested without ever
//! locking, creating or writing it.
//! Must not: take the lock, even for an instant (a copy starting then would believe it held).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::holder::Holder;
use crate::plan::LockPlan;

use super::ofd::is_held;
use super::open::{file_type_name, is_ours, only_regular};
use super::reader::{look_at_record, read_holder, read_holder_async, unknown_holder};
use super::record::read_content;
use super::walk::{refuse_procfs_on_the_way, walk_dir};

/// Reads the current holder of `path` without locking anything (for `status` and timeouts).
pub(super) fn peek_holder(path: &Path) -> Option<Holder> {
    // Looked at before it is opened: anything but a regular file is never opened (see
    // `only_regular`); one swapped in after the look is refused after the open.
    only_regular(path, &rustix::fs::lstat(path).ok()?).ok()?;
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

/// Refuses the way to `plan`'s lock directory as an acquisition would ([`walk_dir`]'s checks:
/// a symlink or a directory on the way that another user controls, a procfs link), so that a
/// look never says "not running" where `run` says "unsafe lock path". Creates and opens
/// nothing but what the walk opens to look; anything else the walk meets (a directory not
/// made yet) is left for the look at the file to say.
pub(crate) fn refuse_unsafe_way(plan: &LockPlan) -> Result<()> {
    match walk_dir(plan, rustix::process::geteuid().as_raw()) {
        Err(e @ Error::UnsafeLockPath { .. }) => Err(e),
        _ => Ok(()),
    }
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
        return Err(Error::NotALockFile {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(None)
}

/// A copy that holds the lock file of `plan`'s name in the shared system directory, when
/// `plan` is a deployed service's own directory (`/run/unique-instance/NAME`): one started
/// before the deployment made that directory planned the shared one, and a copy planning now
/// would otherwise never meet it. The lock file found there, read-only, and its holder.
///
/// Believed only when the file is root's or the owner of the service's directory: the shared
/// directory is writable by everyone, and a local user's file there must not keep the service
/// from running (the squatting its own directory closes). Anything unexpected at that path is
/// not a holder either (an acquisition there would refuse it; here it is not ours to judge).
pub(crate) async fn earlier_copy_in_shared_dir(plan: &LockPlan) -> Option<(OwnedFd, Holder)> {
    if !plan.service_dir {
        return None;
    }
    let trusted = [0, rustix::fs::stat(&plan.dir).ok()?.st_uid];
    let path = Path::new(crate::SYSTEM_LOCK_DIR).join(&plan.file_name);
    let believed = |st: &rustix::fs::Stat| {
        FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && trusted.contains(&st.st_uid)
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
    let holder = read_holder_async(&file, &path).await;
    Some((file, holder))
}

/// How often [`until_let_go`] looks again: this wait is for a copy left from before a
/// deployment, once, not a take-over path worth events.
const LET_GO_RECHECK: Duration = Duration::from_millis(100);

/// Waits until nobody holds the lock of `file` (see [`earlier_copy_in_shared_dir`]), or until
/// `deadline`: `false` then. An error testing the lock counts as still held (fail closed).
pub(crate) async fn until_let_go(file: &OwnedFd, deadline: Option<Instant>) -> bool {
    loop {
        if let Ok(false) = is_held(file) {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() + LET_GO_RECHECK > d) {
            if let Some(d) = deadline {
                tokio::time::sleep_until(d.into()).await;
            }
            return matches!(is_held(file), Ok(false));
        }
        tokio::time::sleep(LET_GO_RECHECK).await;
    }
}
