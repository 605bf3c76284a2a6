//! The inotify instance a guard lends with its lock for hand-over
//! ([`InstanceGuard::lock_file_watch_descriptor`](crate::InstanceGuard::lock_file_watch_descriptor)):
//! what a process given a duplicate can tell of it before reading its events
//! (`HandedLockFile::with_watch`).
//! Must not: read the instance (its events are `NameHistory::read`'s) or add watches to it.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The events of a directory's entries that say our name was removed or made
/// (`IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE`): a watch of our directory with all of
/// them has queued every removal of our file, and every file made at its name, since it was
/// added.
const ENTRY_EVENTS: u32 = rustix::fs::inotify::WatchFlags::MOVED_FROM
    .union(rustix::fs::inotify::WatchFlags::MOVED_TO)
    .union(rustix::fs::inotify::WatchFlags::CREATE)
    .union(rustix::fs::inotify::WatchFlags::DELETE)
    .bits();

/// Is `fd` an inotify instance? (`/proc/self/fd` names one `anon_inode:inotify`.) False when
/// that cannot be told (no `/proc`).
pub(super) fn is_inotify(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:inotify")
}

/// Does the inotify instance `fd` already watch the directory (`dev`, `ino`) for the events of
/// its entries (see [`ENTRY_EVENTS`])? Then every removal of our file and every file made at our
/// name since that watch was added is in its queue, or was read by whoever read it. False when
/// it does not, or when that cannot be told (no `/proc`).
pub(super) fn watches_entries_of(fd: BorrowedFd<'_>, dev: u64, ino: u64) -> bool {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .is_ok_and(|info| fdinfo_watches_entries_of(&info, dev, ino))
}

/// [`watches_entries_of`] on the text of an inotify instance's `fdinfo`: one line per watch,
/// `inotify wd:1 ino:1f2 sdev:800001 mask:fc6 ...`, numbers in hex, `sdev` the kernel's own
/// encoding of the device (major above the low 20 bits, minor in them).
fn fdinfo_watches_entries_of(info: &str, dev: u64, ino: u64) -> bool {
    info.lines()
        .filter_map(|line| line.strip_prefix("inotify "))
        .any(|watch| {
            let field = |key: &str| {
                watch
                    .split(' ')
                    .find_map(|word| word.strip_prefix(key))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            };
            let (Some(watched_ino), Some(sdev), Some(mask)) =
                (field("ino:"), field("sdev:"), field("mask:"))
            else {
                return false;
            };
            let watched_dev = rustix::fs::makedev((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32);
            watched_ino == ino
                && watched_dev == dev
                && mask & u64::from(ENTRY_EVENTS) == u64::from(ENTRY_EVENTS)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_of_the_directorys_entries_is_found_by_device_and_inode() {
        // sdev 8:1 (kernel encoding 0x800001); the userspace number is `makedev(8, 1)`.
        let dev = rustix::fs::makedev(8, 1);
        let info = "pos:\t0\nflags:\t02004000\nmnt_id:\t15\nino:\t1057\n\
                    inotify wd:2 ino:1f2 sdev:800001 mask:c00 ignored_mask:0 fhandle-bytes:8 \
                    fhandle-type:1 f_handle:f201000000000000\n\
                    inotify wd:1 ino:a sdev:800001 mask:40003fc0 ignored_mask:0 fhandle-bytes:8 \
                    fhandle-type:1 f_handle:0a00000000000000\n";
        assert!(fdinfo_watches_entries_of(info, dev, 0xa));
        // Watched for itself only (a directory on the way): its entries' events were not queued.
        assert!(!fdinfo_watches_entries_of(info, dev, 0x1f2));
        assert!(!fdinfo_watches_entries_of(
            info,
            rustix::fs::makedev(8, 2),
            0xa
        ));
        assert!(!fdinfo_watches_entries_of(info, dev, 0xb));
        assert!(!fdinfo_watches_entries_of("", dev, 0xa));
        // A minor number above 255 (the kernel and userspace encode it differently).
        let big = rustix::fs::makedev(259, 0x1234);
        let info = "inotify wd:1 ino:a sdev:10301234 mask:3c0 ignored_mask:0\n";
        assert!(fdinfo_watches_entries_of(info, big, 0xa));
    }

    #[test]
    fn an_inotify_instance_and_its_watches_are_told_through_proc() {
        use rustix::fs::inotify::{WatchFlags, add_watch};
        use std::os::fd::AsFd;
        let inotify = super::super::watch::new_inotify().expect("inotify");
        assert!(is_inotify(inotify.as_fd()));
        let file = tempfile::tempfile().expect("a file");
        assert!(!is_inotify(file.as_fd()));
        let dir = tempfile::tempdir().expect("tempdir");
        let st = rustix::fs::stat(dir.path()).expect("stat");
        assert!(!watches_entries_of(inotify.as_fd(), st.st_dev, st.st_ino));
        add_watch(&inotify, dir.path(), WatchFlags::MOVE_SELF).expect("watch");
        assert!(!watches_entries_of(inotify.as_fd(), st.st_dev, st.st_ino));
        let entries = WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::MASK_ADD;
        add_watch(&inotify, dir.path(), entries).expect("watch");
        assert!(watches_entries_of(inotify.as_fd(), st.st_dev, st.st_ino));
    }
}
