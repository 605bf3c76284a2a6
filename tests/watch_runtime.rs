//! The watches of a guard do not depend on what the program does with its runtime, and the
//! durations given to the options cannot make a watch panic, spin or vanish.

use std::time::Duration;

use unique_instance::{Backend, Error, InstanceGuard, InstanceOptions, LossReason, Scope, Wait};

/// Long enough for any machine, and only reached when the watch is broken.
const PATIENCE: Duration = Duration::from_secs(30);

fn options(dir: &std::path::Path, test: &str) -> InstanceOptions {
    let name = format!("org.uniqueinstance.Test.{test}.p{}", std::process::id());
    InstanceOptions::new(name)
        .lock_dir(dir)
        .scope(Scope::User)
        .backend(Backend::LockFile)
}

/// Removes the guard's lock file and expects it re-created (the watch saw it), then a second
/// copy refused.
fn removal_is_seen(guard: &InstanceGuard, second: InstanceOptions) {
    let mut recreations = guard.lock_file_recreations();
    std::fs::remove_file(guard.lock_file().expect("a lock file")).expect("remove the lock file");
    assert_eq!(
        recreations.next_blocking(Some(PATIENCE)),
        Some(1),
        "the removed lock file was not re-created: nothing watches it (losses {:?})",
        guard.losses()
    );
    assert!(guard.is_exclusive(), "losses {:?}", guard.losses());
    match second.acquire() {
        Err(Error::AlreadyRunning { .. }) => {}
        other => panic!("a second copy was not refused: {other:?}"),
    }
}

/// An async guard whose runtime is dropped (the current-thread or multi-thread flavor) still
/// watches its lock file.
#[test]
fn an_async_guard_watches_after_its_runtime_is_dropped() {
    for multi in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let test = format!("RuntimeDropped{multi}");
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .expect("runtime");
        let guard = rt
            .block_on(options(dir.path(), &test).acquire_async())
            .expect("acquire");
        drop(rt);
        removal_is_seen(&guard, options(dir.path(), &test));
        guard.release().expect("release");
    }
}

/// Nor when the runtime is kept but never run again.
#[test]
fn an_async_guard_watches_while_its_runtime_is_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let guard = rt
        .block_on(options(dir.path(), "RuntimeIdle").acquire_async())
        .expect("acquire");
    removal_is_seen(&guard, options(dir.path(), "RuntimeIdle"));
    guard.release().expect("release");
    drop(rt);
}

/// A zero re-check interval is taken as the shortest one: the re-check runs (it used to panic
/// its task, and with the inotify watch off nothing watched any more). What it finds, a removal
/// no event showed, is a loss (another copy may have come and gone between two checks).
#[test]
fn a_zero_recheck_interval_still_rechecks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || {
        options(dir.path(), "RecheckZero")
            .watch_lock_file(false)
            .recheck_lock_file(Duration::ZERO)
    };
    let mut guard = opts().acquire().expect("acquire");
    std::fs::remove_file(guard.lock_file().expect("a lock file")).expect("remove the lock file");
    let loss = guard
        .wait_next_loss(Some(PATIENCE))
        .expect("the removal was not found: nothing re-checks the lock file");
    assert_eq!(loss.reason, LossReason::LockFileRemoved, "{loss:?}");
    assert!(!loss.still_exclusive, "{loss:?}");
    guard.release().expect("release");
}

/// A wait too long to be a deadline is a wait without one (it used to panic on the overflow).
#[test]
fn an_endless_timeout_is_no_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || options(dir.path(), "EndlessTimeout").wait(Wait::Timeout(Duration::MAX));
    opts()
        .acquire()
        .expect("acquire")
        .release()
        .expect("release");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let guard = rt.block_on(opts().acquire_async()).expect("acquire_async");
    rt.block_on(guard.release_async()).expect("release");
}

/// A busy lock directory (a tmp cleaner sweeping `/tmp`: files made and removed beside ours)
/// whose holder's file is removed: re-created, never a loss, wherever the removal falls among
/// the other events. It was a loss in about 4 rounds in 100: the watch, woken by the other
/// files, had read its queue just before our file went, found it gone with its removal not yet
/// read, and took that for a removal it had not seen.
#[test]
fn a_removal_among_other_changes_in_the_directory_is_recreated() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for round in 0..100 {
        let dir = tempfile::tempdir().expect("tempdir");
        let guard = options(dir.path(), &format!("BusyDir{round}"))
            .acquire()
            .expect("acquire");
        let mut recreations = guard.lock_file_recreations();
        let stop = Arc::new(AtomicBool::new(false));
        let (started, churning) = std::sync::mpsc::channel();
        let churn = {
            let (stop, dir) = (Arc::clone(&stop), dir.path().to_owned());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let junk = dir.join(format!("junk{}", i % 8));
                    let _ = std::fs::write(&junk, b"");
                    let _ = std::fs::remove_file(&junk);
                    if i == 0 {
                        let _ = started.send(());
                    }
                    i += 1;
                }
            })
        };
        churning.recv_timeout(PATIENCE).expect("the churn started");
        std::fs::remove_file(guard.lock_file().expect("a lock file")).expect("remove");
        let recreated = recreations.next_blocking(Some(PATIENCE));
        stop.store(true, Ordering::Relaxed);
        churn.join().expect("churn");
        assert_eq!(
            recreated,
            Some(1),
            "round {round}: not re-created; losses {:?}",
            guard.losses()
        );
        assert!(guard.is_exclusive(), "round {round}: {:?}", guard.losses());
        guard.release().expect("release");
    }
}
