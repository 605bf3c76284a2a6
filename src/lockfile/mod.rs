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
//!
//! This file is the backend's surface for the acquisition code, and nothing else: each concept
//! is a file of its own below. Must not: know about the bus, or about the options beyond the
//! [`LockPlan`](crate::plan::LockPlan) it is given.

mod attempt;
mod dir;
mod grace;
mod handed;
mod held;
mod lent;
mod netfs;
mod ofd;
mod open;
mod part;
mod probe;
mod reader;
mod record;
mod recover;
mod wait;
mod walk;
mod watch;
mod watcher;

pub(crate) use attempt::{Attempt, lock};
pub(crate) use dir::open_dir;
pub use handed::{
    HandedLockFile, HandedLockState, record_this_process_as_holder,
    record_this_process_as_holder_keeping_bus_name,
};
pub(crate) use held::ReleaseReport;
pub(crate) use open::read_locked;
pub(crate) use part::HeldFile;
pub(crate) use probe::{
    copy_in_the_other_dir_async, copy_in_the_other_dir_blocking, holder_now, holder_of,
    holder_of_async, refuse_unheld_file, refuse_unsafe_way, until_the_other_dir_is_free,
};
// For the fuzz targets' entry points (src/fuzzing.rs).
#[cfg(any(fuzzing, test))]
pub(crate) use record::{LockRecord, MAX_RECORD_LEN};
#[cfg(any(fuzzing, test))]
pub(crate) use record::{is_kept, takeover_placeholder};
pub(crate) use wait::{timed_out, try_lock, wait_lock};
pub(crate) use watch::new_inotify;
