//! `status` beside a copy that is starting, in a test binary of its own (see the test).

mod common;

use std::path::Path;

use common::unique_name;
use unique_instance::{Backend, InstanceOptions};

fn lock_only(name: &str, dir: &Path) -> InstanceOptions {
    InstanceOptions::new(name)
        .backend(Backend::LockFile)
        .lock_dir(dir)
}

/// `status` must never get in the way of a copy that is starting: it tests the lock without
/// taking it, not even a shared lock for an instant (with which a copy starting at that moment
/// would be refused as "already running (holder unknown)"). A crashed holder's file is left in
/// place, unlocked, while a thread asks `status` about it in a tight loop; every acquisition
/// must succeed. (Locks belong to open files, so a thread probes exactly as a process would.)
///
/// In a test binary of its own: the acquisitions are made in this process, and a test on
/// another thread of the same process that starts a program shares every descriptor of ours
/// from its `fork` to its `exec`, the lock's too, so that the next round would find the lock
/// still held for that moment (a user's file, which the release leaves in place: the full
/// suite failed so twice, and a thread spawning `true` in a loop beside these rounds made it
/// fail within 1 100 rounds).
#[test]
fn status_never_makes_a_starting_copy_see_the_instance_as_running() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status_probe");
    let path = dir.path().join(format!("{name}.lock"));
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, probes) = (Arc::clone(&stop), Arc::clone(&probes));
        let options = lock_only(&name, dir.path());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            while !stop.load(Ordering::Relaxed) {
                rt.block_on(unique_instance::status(&options))
                    .expect("status");
                probes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Enough rounds and enough probes alongside them, however the two threads get scheduled.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let mut round = 0;
    while round < 300 || probes.load(Ordering::Relaxed) < 2000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the prober made only {} probes in {:?}",
            probes.load(Ordering::Relaxed),
            common::TIMEOUT
        );
        round += 1;
        // What a SIGKILLed holder leaves behind: its file, unlocked.
        std::fs::write(&path, b"").expect("leave a crashed holder's file");
        let acquired = lock_only(&name, dir.path()).acquire();
        if let Err(e) = &acquired {
            stop.store(true, Ordering::Relaxed);
            panic!("round {round}: a status probe made the instance look busy: {e}");
        }
        drop(acquired);
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
}
