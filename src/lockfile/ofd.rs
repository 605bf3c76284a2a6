//! The open-file-description lock primitives (`F_OFD_SETLK[W]`, `F_OFD_GETLK`) and the `EINTR`
//! retry every system call here goes through.
//! Must not: know about paths, records or policy: descriptors in, kernel answers out.

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use rustix::io::Errno;

pub(super) fn retry_eintr<T>(
    mut f: impl FnMut() -> rustix::io::Result<T>,
) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
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
pub(super) fn lock_exclusive(file: &OwnedFd, block: bool) -> rustix::io::Result<()> {
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

/// Takes a read lock on the whole of `file` (open for reading), without waiting: `false` when
/// someone holds a write lock on it (a copy). While it is held, no copy can take the file.
pub(super) fn read_lock(file: &OwnedFd) -> rustix::io::Result<bool> {
    let lock = whole_file(libc::F_RDLCK);
    match retry_eintr(|| {
        fcntl(file, FcntlArg::F_OFD_SETLK(&lock))
            .map(drop)
            .map_err(nix_errno)
    }) {
        Ok(()) => Ok(true),
        Err(Errno::AGAIN | Errno::ACCESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until nobody holds `file` exclusively, on a descriptor open only for reading, by taking
/// a shared lock; the caller drops it (closing `file`) at once. `EINTR` is retried.
pub(super) fn wait_unlocked(file: &OwnedFd) -> rustix::io::Result<()> {
    let lock = whole_file(libc::F_RDLCK);
    retry_eintr(|| {
        fcntl(file, FcntlArg::F_OFD_SETLKW(&lock))
            .map(drop)
            .map_err(nix_errno)
    })
}

/// Does a copy hold `file`: does another open file description hold a *write* lock on it (the
/// lock an instance takes)? Asked with `F_OFD_GETLK` for a read lock, which takes nothing and
/// is refused only by a write lock. A read lock is nobody's instance: anyone who may read the
/// file can take one (a review: a local user's read lock on a service's lock file made every
/// copy say "already running"), and a waiter takes one for a moment (see [`wait_unlocked`]).
pub(super) fn is_held(file: impl AsFd) -> rustix::io::Result<bool> {
    Ok(conflicting(file, libc::F_RDLCK)? == Some(libc::F_WRLCK))
}

/// Does the open file description of `file` itself hold a write lock on it? The kernel lists in
/// `/proc/self/fdinfo/FD` the locks taken through that description and no other's, where
/// `F_OFD_GETLK` on it sees only other descriptions' locks, and on a fresh one anyone's (a
/// review: the lock let go through a description shared with another process, and taken by
/// another copy, was verified as ours). False when that cannot be read (no `/proc`): see
/// `WatchHandle::verify_held` for what is then looked at instead.
pub(super) fn holds_write_lock(file: impl AsFd) -> bool {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fdinfo/{}", file.as_fd().as_raw_fd());
    std::fs::read_to_string(path).is_ok_and(|info| {
        info.lines().any(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some("lock:")
                && line.contains("OFDLCK")
                && line.split_whitespace().any(|word| word == "WRITE")
        })
    })
}

/// Does anyone hold any lock on `file` (a read lock included) that would keep us from locking
/// it exclusively?
pub(super) fn is_locked_at_all(file: impl AsFd) -> rustix::io::Result<bool> {
    Ok(conflicting(file, libc::F_WRLCK)?.is_some())
}

/// The type of a lock another open file description holds on `file` that conflicts with a
/// `lock_type` lock on the whole file, if any (`F_OFD_GETLK`, which takes nothing).
fn conflicting(file: impl AsFd, lock_type: libc::c_int) -> rustix::io::Result<Option<libc::c_int>> {
    let mut probe = whole_file(lock_type);
    retry_eintr(|| fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe)).map_err(nix_errno))?;
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(libc::c_int::from(probe.l_type)))
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_raw_os_error(e as i32)
}
