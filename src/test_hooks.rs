//! Test hooks: a copy stops itself (`SIGSTOP`) at a named moment of an acquisition or a
//! release, so that a test (tests/acquire_faults.rs) can act at a moment it could not otherwise
//! reach, then let it go on with `SIGCONT`. Each stops a process once, the first time it gets
//! there, when the hook's environment variable is set.
//!
//! Compiled in only with the `test-hooks` cargo feature, which this crate's own test runs turn
//! on (`./scripts/test`); without it (any program that uses the library) the variables are
//! never looked at, and each call here is nothing.
//! A leaf: called from the backends and from `acquire`, it knows none of them.

/// A moment a test can stop a copy at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hook {
    /// Just before a copy opens its lock file (`lockfile::attempt::settle`).
    BeforeLockFile,
    /// Just before a waiting copy waits for an event (`lockfile::wait`).
    InLockWait,
    /// Just before a copy sends `RequestName` (`dbus::name::own_name`); with it set,
    /// `RequestName` is not sent with the handshake.
    BeforeRequestName,
    /// Just before a holder sends `ReleaseName` (`dbus::release`).
    BeforeReleaseName,
    /// When a waiting copy finds no held file at the path while the file it waited on, removed
    /// or replaced, is still held, and goes on waiting (`lockfile::wait::may_be_free`).
    WaitingOnARemovedFile,
    /// When an attempt finds the lock file, held by nobody, with a second name, before it waits
    /// for that to change (`lockfile::attempt`).
    OnASecondName,
    /// In a holder's lock-file watch thread, before it adds its inotify watches
    /// (`lockfile::watcher`): the holder is stopped with its watch not in place yet.
    BeforeLockWatch,
    /// In a holder's watch, once it has decided to re-create its removed lock file, just before
    /// it makes the new one (`lockfile::recover`).
    BeforeRecreate,
    /// In a holder's watch, once it has read that a link on the way was made anew, before it
    /// looks at the path (`lockfile::watcher`).
    AfterLinkRead,
    /// When an attempt has found its lock file read-locked, by no copy, through a whole grace,
    /// just before it removes it (`lockfile::attempt::remove_squatted`).
    BeforeRemovingSquatted,
    /// When an attempt has read, without a lock, content at the lock path that is not a lock
    /// file's, before it tests whether anyone holds that file (`lockfile::open`).
    AfterReadingForeignContent,
    /// When a copy removing a lock file no copy holds has found that the path still names it,
    /// just before it unlinks it (`lockfile::open::remove_unheld`).
    BeforeUnlinkingUnheld,
    /// When `status` has looked at the lock file, before it asks the bus (`status`).
    StatusBeforeAskingTheBus,
    /// When a copy is in the bus's queue for the name, its place recorded in its lock file or
    /// not, just before it waits to be granted the name (`dbus::name::own_name`).
    InBusQueue,
}

impl Hook {
    /// Whether a test asked for a stop at this hook.
    pub(crate) fn armed(self) -> bool {
        #[cfg(feature = "test-hooks")]
        return std::env::var_os(imp::var(self)).is_some();
        #[cfg(not(feature = "test-hooks"))]
        false
    }
}

/// Stops this process at `hook` if a test asked for it, the first time it gets there.
pub(crate) fn stop_at(hook: Hook) {
    #[cfg(feature = "test-hooks")]
    imp::stop_at(hook);
    #[cfg(not(feature = "test-hooks"))]
    let _ = hook;
}

#[cfg(feature = "test-hooks")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::Hook;

    /// The environment variable that asks for a stop at `hook`.
    pub(super) fn var(hook: Hook) -> &'static str {
        match hook {
            Hook::BeforeLockFile => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_LOCK_FILE",
            Hook::InLockWait => "UNIQUE_INSTANCE_TEST_STOP_IN_LOCK_WAIT",
            Hook::BeforeRequestName => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_REQUEST_NAME",
            Hook::BeforeReleaseName => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_RELEASE_NAME",
            Hook::WaitingOnARemovedFile => "UNIQUE_INSTANCE_TEST_STOP_WAITING_ON_A_REMOVED_FILE",
            Hook::OnASecondName => "UNIQUE_INSTANCE_TEST_STOP_ON_A_SECOND_NAME",
            Hook::BeforeLockWatch => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_LOCK_WATCH",
            Hook::BeforeRecreate => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_RECREATE",
            Hook::AfterLinkRead => "UNIQUE_INSTANCE_TEST_STOP_AFTER_LINK_READ",
            Hook::BeforeRemovingSquatted => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_REMOVING_SQUATTED",
            Hook::AfterReadingForeignContent => {
                "UNIQUE_INSTANCE_TEST_STOP_AFTER_READING_FOREIGN_CONTENT"
            }
            Hook::BeforeUnlinkingUnheld => "UNIQUE_INSTANCE_TEST_STOP_BEFORE_UNLINKING_UNHELD",
            Hook::InBusQueue => "UNIQUE_INSTANCE_TEST_STOP_IN_BUS_QUEUE",
            Hook::StatusBeforeAskingTheBus => {
                "UNIQUE_INSTANCE_TEST_STOP_STATUS_BEFORE_ASKING_THE_BUS"
            }
        }
    }

    pub(super) fn stop_at(hook: Hook) {
        // One per hook: `InBusQueue` is the last (a hook added after it must take its place
        // here, or its stop indexes past the end, which a test that arms it reports at once).
        const HOOKS: usize = Hook::InBusQueue as usize + 1;
        static STOPPED: [AtomicBool; HOOKS] = [const { AtomicBool::new(false) }; HOOKS];
        if hook.armed() && !STOPPED[hook as usize].swap(true, Ordering::Relaxed) {
            // To this thread (`raise`), not to the process: a process-directed SIGSTOP may be
            // taken by another thread, and this one, back from `kill`, would run on past the
            // hook until the group stop reached it (a watch thread's hook then stopped it only
            // after the very step it was to stop before).
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
    }
}
