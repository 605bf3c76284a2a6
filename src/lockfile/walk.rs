//! The walk to the lock directory, one component at a time from `/`, checking every directory
//! and symlink on the way before it is used.
//! Must not: create anything; `dir.rs` decides what may be made.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result, UnsafeLockPath};
use crate::plan::LockPlan;

use super::dir::dir_error;
use super::watch::{Way, others_may_rename_in};

/// How many symlinks a lock directory's path may go through, as the kernel allows (`ELOOP`).
pub(super) const MAX_SYMLINKS: u32 = 40;

/// The end of [`walk_dir`], with the way the walk went (for the watches: see
/// `WatchHandle::add_watches_now`).
pub(super) enum Walked {
    /// The directory, open, and its `fstat`.
    Found(OwnedFd, Stat, Way),
    /// Only the path's own last component is missing: the directory above it, and the name.
    Missing(OwnedFd, OsString, Way),
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
pub(super) fn walk_dir(plan: &LockPlan, euid: u32) -> Result<Walked> {
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
    let io = |context, e: Errno| dir_error(plan, context, e);
    if !plan.dir.is_absolute() {
        return Err(io("lock directory is not absolute", Errno::INVAL));
    }
    let root = Path::new("/");
    let st = rustix::fs::lstat(root).map_err(|e| io("cannot stat / on the way to", e))?;
    check_on_the_way(plan, root, &st, euid, false)?;
    let mut way = Way {
        others_may_rename: others_may_rename_in(st.st_mode),
        ..Way::default()
    };
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
                    way.others_may_rename |= others_may_rename_in(st.st_mode);
                    way.entered.push(here);
                    return Ok(Walked::Found(dir, st, way));
                }
                Err(Errno::NOENT) if own_last => {
                    let parent = rustix::fs::open(
                        &resolved,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| dir_error(plan, "cannot open lock directory", e))?;
                    // The directory as it will be once made (`open_dir` makes it there).
                    way.entered.push(here);
                    return Ok(Walked::Missing(parent, name, way));
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
                way.others_may_rename |= others_may_rename_in(st.st_mode);
                way.entered.push(here.clone());
                resolved = here;
            }
            FileType::Symlink => {
                // Checked before anything else about it: a procfs link's owner says nothing.
                not_in_procfs(&plan.dir, &here, rustix::fs::statfs(&resolved))?;
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
                way.links.push((resolved.clone(), name.clone()));
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
    way.others_may_rename |= others_may_rename_in(st.st_mode);
    // As `way_to` has it: `/` is never entered (it can be neither moved nor removed).
    if resolved != Path::new("/") && way.entered.last() != Some(&resolved) {
        way.entered.push(resolved);
    }
    Ok(Walked::Found(dir, st, way))
}

/// The rule for each directory on the way to the lock directory (see [`walk_dir`]). A
/// per-service directory itself may belong to the service's user (root made it so: only root
/// can write the directory above it).
pub(super) fn check_on_the_way(
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

/// Refuses a symbolic link on the way that is in procfs (`statfs` of the directory holding it,
/// as `fs`): `/proc/self`, `/proc/thread-self`, `/proc/PID/cwd`, `/proc/PID/root`,
/// `/proc/PID/fd/N`... are not ordinary symlinks but lead each process that follows them to its
/// own place, so two copies given the same path (`/proc/self/cwd/x.lock` from two directories)
/// would lock two different files and both run. `path` is the lock path (or its directory) as
/// given, for the error; `link` the link. A directory whose file system cannot be told is let
/// through: the other checks decide. (A file reached in procfs without following any of its
/// links, `/proc/PID/mem`, is the same file for every process: refused, if at all, by the checks
/// of the file itself.)
pub(super) fn not_in_procfs(
    path: &Path,
    link: &Path,
    fs: rustix::io::Result<rustix::fs::StatFs>,
) -> Result<()> {
    match fs {
        #[allow(clippy::unnecessary_cast)] // `f_type`'s width varies between architectures
        Ok(fs) if fs.f_type as i64 == rustix::fs::PROC_SUPER_MAGIC as i64 => {
            Err(Error::UnsafeLockPath {
                path: path.to_owned(),
                problem: UnsafeLockPath::Procfs {
                    link: link.to_owned(),
                },
            })
        }
        _ => Ok(()),
    }
}

/// Whether the way to `path`'s directory, resolved one component at a time as [`walk_dir`]
/// does (symlinks followed by reading them, never through the kernel), follows a link in
/// procfs: refused then, as an acquisition refuses it (see [`not_in_procfs`]). For a look at
/// the lock file that does not walk (`status`): the kernel would follow `/proc/self/cwd` to this
/// process's own directory, and report the file there, not the one a copy elsewhere holds.
/// Anything it cannot follow is left to the look itself.
pub(super) fn refuse_procfs_on_the_way(path: &Path) -> Result<()> {
    use std::collections::VecDeque;
    use std::path::Component;
    let Some(dir) = path.parent().filter(|d| d.is_absolute()) else {
        return Ok(());
    };
    let parts = |p: &Path| -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut queue: VecDeque<OsString> = parts(dir).into();
    let mut resolved = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = queue.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        let Ok(st) = rustix::fs::lstat(&here) else {
            return Ok(());
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => resolved = here,
            FileType::Symlink => {
                not_in_procfs(path, &here, rustix::fs::statfs(&resolved))?;
                links += 1;
                let Ok(target) = std::fs::read_link(&here) else {
                    return Ok(());
                };
                if links > MAX_SYMLINKS {
                    return Ok(());
                }
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for part in parts(&target).into_iter().rev() {
                    queue.push_front(part);
                }
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}
