//! Every public future is `Send`: it can be given to `tokio::spawn` on a multi-thread runtime.

use unique_instance::{InstanceGuard, InstanceOptions, LossWatcher};

fn assert_send<T: Send>(_: &T) {}

/// Checked at compile time: this file does not build if one of them is not `Send`.
#[test]
fn every_public_future_is_send() {
    let options = InstanceOptions::new("org.uniqueinstance.Send");
    assert_send(&unique_instance::status(&options));
    assert_send(&InstanceOptions::new("org.uniqueinstance.Send").acquire_async());
    assert_send(&unique_instance::ensure_single_instance_async(
        "org.uniqueinstance.Send",
    ));
    // Never called: only their types matter.
    fn _guard_futures(mut guard: InstanceGuard, mut watcher: LossWatcher) {
        assert_send(&guard.next_loss());
        assert_send(&watcher.next());
        assert_send(&guard.release_async());
    }
}

/// And spawned for real on a multi-thread runtime, on the bus of the session (the suite runs
/// under `dbus-run-session`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_futures_run_as_spawned_tasks() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = format!("org.uniqueinstance.Test.Spawned.p{}", std::process::id());
    let options = InstanceOptions::new(&name).lock_dir(lock_dir.path());
    let guard = tokio::spawn(options.acquire_async())
        .await
        .expect("join")
        .expect("acquire");
    let options = InstanceOptions::new(&name).lock_dir(lock_dir.path());
    let status = tokio::spawn(async move { unique_instance::status(&options).await })
        .await
        .expect("join")
        .expect("status");
    assert!(status.is_running(), "{status:?}");
    tokio::spawn(guard.release_async())
        .await
        .expect("join")
        .expect("release");
    // An invalid name is refused before anything is touched: spawned all the same.
    let refused = tokio::spawn(unique_instance::ensure_single_instance_async("invalid"))
        .await
        .expect("join");
    assert!(
        matches!(refused, Err(unique_instance::Error::InvalidName { .. })),
        "{refused:?}"
    );
}

/// The guard is `Sync` too: an `Arc<InstanceGuard>` can be shared between tasks. Checked at
/// compile time.
#[test]
fn the_guard_is_sync() {
    fn assert_sync<T: Sync>() {}
    assert_sync::<InstanceGuard>();
}
