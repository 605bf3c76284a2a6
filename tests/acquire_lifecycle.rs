//! Acquisitions that end, are cancelled or are released leave nothing behind: no thread, no
//! descriptor, no bus name or queue entry, no lock; the blocking API works inside runtimes.
//! Over 400 lines: one file for this subject, each test self-contained.

mod common;

use std::path::Path;

use common::{
    BusConfig, DbusDaemon, Proc, clean_command, example_path, field, holder, unique_name,
};

/// The `lifecycle` example running `scenario` for `name`, with `args`.
fn lifecycle(
    bus: Option<&str>,
    lock_dir: &Path,
    scenario: &str,
    name: &str,
    args: &[&str],
) -> Proc {
    let mut cmd = clean_command(&example_path("lifecycle"), bus, lock_dir);
    cmd.arg(scenario).arg(name).args(args);
    Proc::spawn(cmd)
}

fn number(line: &str, key: &str) -> usize {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A wait that times out takes its thread and descriptors with it, and leaves nothing that
/// could take the lock later: once the holder leaves, a fresh copy acquires at once, while the
/// process that gave up is still alive.
#[test]
fn a_timed_out_wait_leaves_nothing_behind() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for (backend, mode) in [
        ("lockfile", "--blocking"),
        ("auto", "--blocking"),
        ("lockfile", "--async"),
        ("auto", "--async"),
    ] {
        let what = format!("{backend} {mode}");
        let name = unique_name("timed_out_wait");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(h.next_line("holder").starts_with("acquired"), "{what}");
        let mut args = vec!["--backend", backend, "--wait-ms", "200"];
        if mode == "--async" {
            args.push("--async");
        }
        let mut w = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "timed-out-wait",
            &name,
            &args,
        );
        let counts = w.line_starting("counts");
        assert_eq!(
            number(&counts, "threads_after"),
            number(&counts, "threads_before"),
            "{what}: a thread outlived the wait: {counts}"
        );
        if mode == "--blocking" || backend == "lockfile" {
            // The blocking API's runtime is gone with the wait, and the lock file alone has no
            // connection: so must every descriptor be.
            assert_eq!(
                number(&counts, "fds_after"),
                number(&counts, "fds_before"),
                "{what}: a descriptor outlived the wait: {counts}"
            );
        }
        // With a bus, async: the connection, ended, is closed when the runtime next runs (the
        // README says so); nothing else may stay (the audit: a task keeping a duplicate of the
        // wait's inotify descriptor failed no test).
        assert_eq!(
            number(&counts, "others_after"),
            number(&counts, "others_before"),
            "{what}: a descriptor other than a socket outlived the wait: {counts}"
        );
        assert_eq!(w.next_line("parked"), "parked", "{what}");
        h.close_stdin();
        assert_eq!(h.line_starting("released"), "released", "{what}");
        // The copy that gave up is still alive: nothing of it may take the lock now.
        let mut fresh = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        let line = fresh.next_line("fresh copy");
        assert!(line.starts_with("acquired"), "{what}: {line}");
        fresh.close_stdin();
        assert_eq!(fresh.exit_code(), 0, "{what}");
        w.close_stdin();
        assert_eq!(w.exit_code(), 0, "{what}");
    }
}

/// `acquire()`, `LossWatcher::next_blocking`, `InstanceGuard::wait_next_loss` and `release()`
/// work inside any tokio runtime, in its `block_on` or in a task, on every backend: no panic
/// ("Cannot start a runtime from within a runtime"), and the instance is really released.
#[test]
fn the_blocking_api_works_inside_any_runtime() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for backend in ["lockfile", "auto", "dbus"] {
        for flavor in ["current", "multi"] {
            for place in ["block-on", "task"] {
                let what = format!("{backend} {flavor} {place}");
                let name = unique_name("blocking_in_runtime");
                let args = ["--backend", backend, "--flavor", flavor, "--in", place];
                let mut p = lifecycle(
                    Some(&bus.address),
                    lock_dir.path(),
                    "blocking-in-runtime",
                    &name,
                    &args,
                );
                assert_eq!(p.next_line("acquire"), "acquire ok", "{what}");
                assert_eq!(p.next_line("next_blocking"), "next_blocking None", "{what}");
                assert_eq!(
                    p.next_line("wait_next_loss"),
                    "wait_next_loss None",
                    "{what}"
                );
                assert_eq!(p.next_line("release"), "release ok", "{what}");
                assert_eq!(p.next_line("done"), "done", "{what}");
                assert_eq!(p.exit_code(), 0, "{what}");
                // Released for real: a fresh copy gets it at once.
                let mut fresh = holder(
                    Some(&bus.address),
                    lock_dir.path(),
                    &[&name, "--backend", backend],
                );
                let line = fresh.next_line("fresh copy");
                assert!(line.starts_with("acquired"), "{what}: {line}");
            }
        }
    }
}

/// Does anyone own `name` on the bus at `address`?
fn name_has_owner(address: &str, name: &str) -> bool {
    !common::queued_owners(address, name).is_empty()
}

/// A cancelled acquisition (its future dropped by a timeout) leaves nothing owned, queued or
/// locked, even when its runtime never runs again: once the holder leaves, a third copy gets
/// the instance, not the process that gave up.
#[test]
fn a_cancelled_acquisition_keeps_nothing() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    // dbus: cancelled while queued on the bus; auto: while waiting for the lock file (with a
    // bus connection made meanwhile).
    for backend in ["dbus", "auto"] {
        let name = unique_name("cancelled");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(h.next_line("holder").starts_with("acquired"), "{backend}");
        let args = ["--backend", backend, "--wait-ms", "300"];
        let mut c = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "cancel-queued",
            &name,
            &args,
        );
        assert_eq!(c.next_line("cancelled"), "cancelled", "{backend}");
        h.close_stdin();
        assert_eq!(h.line_starting("released"), "released", "{backend}");
        // The cancelled copy is alive, its runtime idle: it must not be handed the name.
        let mut third = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        let line = third.next_line("third copy");
        assert!(
            line.starts_with("acquired"),
            "{backend}: the cancelled acquisition kept the instance: {line}"
        );
        third.close_stdin();
        assert_eq!(third.exit_code(), 0, "{backend}");
        c.close_stdin();
        assert_eq!(c.exit_code(), 0, "{backend}");
    }
}

/// Releasing frees the bus name and then the lock file before it returns, whatever runtime it
/// runs in (`release_async` too, on a runtime other than the acquiring one), and reports
/// success for a name it did release.
#[test]
fn release_frees_name_and_lock_file_before_it_returns() {
    releases_free_name_and_lock_file_before_they_return(&DbusDaemon::start(BusConfig::Open));
}

/// The same over TCP, a transport whose socket zbus would make itself (a review: a guard
/// released inside its current-thread runtime reported success, the lock file was freed, and
/// the name stayed owned until that runtime ran again, so the next copy was refused).
/// dbus-daemon only: dbus-broker serves no TCP.
#[test]
fn tcp_release_frees_name_and_lock_file_before_it_returns() {
    releases_free_name_and_lock_file_before_they_return(&DbusDaemon::start_listening(
        BusConfig::Open,
        "",
        Some("tcp:host=127.0.0.1,bind=127.0.0.1,port=0"),
        "<auth>ANONYMOUS</auth><allow_anonymous/>",
    ));
}

fn releases_free_name_and_lock_file_before_they_return(bus: &DbusDaemon) {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        // acquire_async on a current-thread runtime, released inside it (which it owns and
        // which is blocked in the drop), or outside it once it went idle.
        &["--async", "--flavor", "current", "--in", "drop-in-runtime"],
        &[
            "--async",
            "--flavor",
            "current",
            "--in",
            "release-in-runtime",
        ],
        &["--async", "--flavor", "current", "--in", "drop"],
        &["--async", "--flavor", "current", "--in", "release"],
        &["--async", "--flavor", "multi", "--in", "drop-in-runtime"],
        &["--async", "--flavor", "multi", "--in", "release-in-runtime"],
        &["--async", "--flavor", "multi", "--in", "drop"],
        // release_async on another runtime than the one that made the connection, which is
        // idle meanwhile: no reply to ReleaseName can be read there.
        &[
            "--async",
            "--flavor",
            "current",
            "--in",
            "release-async-elsewhere",
        ],
        // The blocking API.
        &["--in", "drop"],
        &["--in", "release"],
        &["--in", "release-async-elsewhere"],
        // The multi-thread runtime that acquired is dropped first, and zbus's reader task with
        // it, while the program keeps a clone of the connection: zbus calls it closed, but its
        // socket, and the name, stay (a review: `release_async` took closed for released,
        // returned Ok with the name still owned, and freed the lock file, so the next copy got
        // the lock file and was refused by the name).
        &[
            "--async",
            "--flavor",
            "multi",
            "--keep-connection",
            "--drop-runtime",
            "--in",
            "release-async-elsewhere",
        ],
        &[
            "--async",
            "--flavor",
            "multi",
            "--keep-connection",
            "--drop-runtime",
            "--in",
            "release",
        ],
    ];
    for args in cases {
        let what = args.join(" ");
        let name = unique_name("release_order");
        let mut p = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "release-order",
            &name,
            args,
        );
        assert_eq!(p.next_line("acquired"), "acquired", "{what}");
        assert!(name_has_owner(&bus.address, &name), "{what}");
        p.send("go\n");
        assert_eq!(p.next_line("released"), "released ok", "{what}");
        // Right after release returned (the process is still alive): both are free.
        assert!(
            !name_has_owner(&bus.address, &name),
            "{what}: the name is still owned after release returned"
        );
        let lock_holder = unique_instance::InstanceOptions::new(&name)
            .lock_dir(lock_dir.path())
            .lock_file_holder()
            .expect("lock_file_holder");
        assert_eq!(lock_holder, None, "{what}: the lock file is still held");
        p.close_stdin();
        assert_eq!(p.exit_code(), 0, "{what}");
    }
}

/// Takes `name` from its owner on the bus at `address` (`REPLACE_EXISTING`), on a connection
/// kept open (with the runtime that made it) until the returned pair is dropped.
fn take_over(address: &str, name: &str) -> (tokio::runtime::Runtime, zbus::Connection) {
    use zbus::fdo::{RequestNameFlags, RequestNameReply};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let conn = rt.block_on(async {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .expect("connect");
        let flags = RequestNameFlags::REPLACE_EXISTING | RequestNameFlags::DO_NOT_QUEUE;
        let reply = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "RequestName",
                &(name, flags),
            )
            .await
            .expect("RequestName")
            .body()
            .deserialize::<RequestNameReply>()
            .expect("reply");
        assert_eq!(reply, RequestNameReply::PrimaryOwner, "take over {name}");
        conn
    });
    (rt, conn)
}

/// A release is no clean end when the bus name had been lost before it and nothing had told
/// the program: the name taken over (the copy allowed replacement) while its runtime was idle,
/// or the bus gone with no lock file held (a review: the bus's `NOT_OWNER` answer to
/// `ReleaseName` was not read, and a connection already closed by the bus counted as a release:
/// `Ok` both times, while another copy had run). With the lock file held as well, the bus's
/// death leaves a clean release: exclusion never lapsed.
#[test]
fn a_name_lost_before_the_release_unseen_is_not_a_clean_release() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    // How the copy acquires and releases: idle between the two, or with a service thread.
    let modes: &[&[&str]] = &[
        &["--async", "--in", "release-async-in-runtime"],
        &["--async", "--in", "release-async-elsewhere"],
        &["--async", "--in", "release"],
        &["--in", "release"],
    ];
    for bus_dies in [false, true] {
        for mode in modes {
            for backend in ["dbus", "auto"] {
                let mut bus = DbusDaemon::start(BusConfig::Open);
                let name = unique_name("lost_unseen");
                let mut args = vec!["--backend", backend, "--allow-replacement"];
                args.extend_from_slice(mode);
                let what = format!("bus_dies={bus_dies} {}", args.join(" "));
                let mut p = lifecycle(
                    Some(&bus.address),
                    lock_dir.path(),
                    "release-order",
                    &name,
                    &args,
                );
                assert_eq!(p.next_line("acquired"), "acquired", "{what}");
                let taken = (!bus_dies).then(|| take_over(&bus.address, &name));
                if bus_dies {
                    bus.kill();
                }
                p.send("go\n");
                let line = p.next_line("released");
                let lost = if bus_dies {
                    "the bus connection closed before the release"
                } else {
                    "replaced by another instance on the bus before the release"
                };
                // A replacement ends the copy's turn whatever else it holds (the watch reports
                // it so); the bus's death leaves the lock file excluding.
                if backend == "dbus" || !bus_dies {
                    assert!(
                        line.starts_with("released err") && line.contains(lost),
                        "{what}: {line}"
                    );
                } else {
                    assert_eq!(line, "released ok", "{what}");
                }
                drop(taken);
                p.close_stdin();
                assert_eq!(p.exit_code(), 0, "{what}");
            }
        }
    }
}

/// A blocking release ends the guard's connection, clones included, as documented: none is
/// left connected to the bus, read by nobody (a review: after `ReleaseName` was answered the
/// connection was left to zbus, and a clone the program kept stayed on the bus, its calls
/// unanswered).
#[test]
fn a_blocking_release_ends_the_connection_clones_included() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for how in ["release", "drop"] {
        let name = unique_name("clone_ends");
        let mut p = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "release-order",
            &name,
            &["--keep-connection", "--in", how],
        );
        assert_eq!(p.next_line("acquired"), "acquired", "{how}");
        p.send("go\n");
        assert_eq!(p.next_line("released"), "released ok", "{how}");
        let kept = p.next_line("kept");
        let unique = kept.strip_prefix("kept ").expect("kept UNIQUE");
        assert!(unique.starts_with(':'), "{how}: {kept}");
        // Right after the release returned, the process still alive with its clone.
        assert!(
            !name_has_owner(&bus.address, unique),
            "{how}: the kept clone {unique} is still on the bus"
        );
        p.close_stdin();
        assert_eq!(p.exit_code(), 0, "{how}");
    }
}

/// A [`unique_instance::LossWatcher`] ends once its guard is released, wherever the guard came
/// from and however it goes: its watchers are told by the release itself, not by the tasks that
/// report losses (a review: a guard from `acquire_async` on a current-thread runtime left idle
/// kept a watcher waiting for ever, since its aborted bus task, which held the loss channel
/// open, is dropped only when that runtime runs again).
#[test]
fn a_loss_watcher_ends_when_its_guard_is_released() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &["--async", "--flavor", "current", "--in", "release"],
        &["--async", "--flavor", "current", "--in", "drop"],
        &[
            "--async",
            "--flavor",
            "current",
            "--in",
            "release-async-elsewhere",
        ],
        &["--async", "--flavor", "current", "--in", "drop-in-runtime"],
        &["--async", "--flavor", "multi", "--in", "release"],
        &["--in", "release"],
        &["--in", "drop"],
    ];
    for args in cases {
        let what = args.join(" ");
        let name = unique_name("watcher_end");
        let mut p = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "release-order",
            &name,
            &[*args, &["--watcher"]].concat(),
        );
        assert_eq!(p.next_line("acquired"), "acquired", "{what}");
        p.send("go\n");
        assert_eq!(p.next_line("released"), "released ok", "{what}");
        assert_eq!(
            p.next_line("the watcher's end"),
            "watcher ended",
            "{what}: a loss watcher outlived its released guard"
        );
        p.close_stdin();
        assert_eq!(p.exit_code(), 0, "{what}");
    }
}

/// A release returns with nothing of the lock file's watch left but the thread, on its way out,
/// and its inotify instance (whose close waits for an RCU grace period): no descriptor of the
/// lock directory, no eventfd (a review: both stayed with the thread, about 200 ms on a busy
/// machine, after every release); and the thread ends soon after.
#[test]
fn a_release_leaves_no_descriptor_of_the_watch() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("release_leftovers");
    let mut p = lifecycle(
        None,
        lock_dir.path(),
        "release-leftovers",
        &name,
        &["--backend", "lockfile", "--rounds", "20"],
    );
    let line = p.next_line("leftovers");
    assert_eq!(number(&line, "rounds"), 20, "{line}");
    assert_eq!(
        number(&line, "dir_fds"),
        0,
        "a descriptor of the lock directory outlived a release: {line}"
    );
    assert_eq!(
        number(&line, "eventfds"),
        0,
        "an eventfd outlived a release: {line}"
    );
    assert_eq!(p.next_line("the watch thread's end"), "threads gone");
    assert_eq!(p.exit_code(), 0);
}

/// A refused copy gives a holder that just took over a crashed one's file a moment to write its
/// record in place of the dead one's, and in async code that moment does not block the
/// runtime: here the record comes back only if another task of the same current-thread runtime
/// runs meanwhile, and the refusal must name the holder.
#[test]
fn the_record_grace_does_not_block_the_runtime() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("record_grace");
    let mut h = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let acquired = h.next_line("holder");
    let pid: u32 = field(&acquired, "pid")
        .and_then(|p| p.parse().ok())
        .expect("pid");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let record = std::fs::read(&path).expect("record");
    // As if the holder had locked a crashed holder's file and not yet written its own record
    // (same inode, lock untouched): the record of a process that is gone.
    let gone_pid = common::gone_pid();
    let dead_record = String::from_utf8(record.clone())
        .expect("UTF-8 record")
        .replace(&format!("\"pid\":{pid},"), &format!("\"pid\":{gone_pid},"));
    assert_ne!(dead_record.as_bytes(), record, "the pid replaced");
    std::fs::write(&path, &dead_record).expect("a dead holder's record");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let options = || {
        unique_instance::InstanceOptions::new(&name)
            .backend(unique_instance::Backend::LockFile)
            .lock_dir(lock_dir.path())
    };
    // Written over the dead one in one `pwrite`, padded to its length, as a holder writes.
    let mut padded = record.clone();
    if padded.len() < dead_record.len() {
        padded.pop();
        padded.resize(dead_record.len() - 1, b' ');
        padded.push(b'\n');
    }
    let write_record = || async {
        use std::os::unix::fs::FileExt;
        tokio::task::yield_now().await;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open the lock file");
        file.write_all_at(&padded, 0).expect("write record");
    };
    let outcome = rt.block_on(async { tokio::join!(options().acquire_async(), write_record()).0 });
    match outcome {
        Err(unique_instance::Error::AlreadyRunning { holder, .. }) => {
            assert_eq!(holder.pid, Some(pid), "acquire_async: {holder}")
        }
        other => panic!("expected already running, got {other:?}"),
    }
    // The same for `status`, another async reader of the lock file.
    std::fs::write(&path, &dead_record).expect("a dead holder's record");
    let status = rt.block_on(async {
        let options = options();
        tokio::join!(unique_instance::status(&options), write_record()).0
    });
    let holder = status.expect("status").holder.expect("a holder");
    assert_eq!(holder.pid, Some(pid), "status: {holder}");
}

/// A guard that owns a bus name, dropped in a child after `fork`, leaves the name and its
/// connection to the process that acquired (the fork rule): the child's drop returns (it does
/// not wait for the service thread, which does not exist in the child), the parent still owns
/// the name, a copy is refused, and the parent's own release then frees it.
#[test]
fn a_guard_with_a_bus_name_dropped_in_a_forked_child_leaves_the_parent_holding() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for mode in [None, Some("--async")] {
        let what = mode.unwrap_or("blocking");
        let name = unique_name("fork_bus");
        let mut cmd = clean_command(
            &example_path("fork_release"),
            Some(&bus.address),
            lock_dir.path(),
        );
        cmd.args([&name, "--backend", "auto"]).args(mode);
        let mut parent = Proc::spawn(cmd);
        let acquired = parent.next_line("acquired");
        assert!(acquired.starts_with("acquired"), "{what}: {acquired}");
        // 14 is SIGALRM: the child was still in its drop after 20 s.
        assert_eq!(
            parent.next_line("the child's drop"),
            "child-dropped status=0",
            "{what}: the guard's drop in the child did not return"
        );
        assert!(
            name_has_owner(&bus.address, &name),
            "{what}: the child's drop took the name from the parent"
        );
        let mut second = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", "dbus"],
        );
        let line = second.next_line("the second copy");
        assert!(line.starts_with("already-running"), "{what}: {line}");
        assert_eq!(second.exit_code(), 75, "{what}");
        parent.close_stdin();
        assert_eq!(parent.next_line("release"), "released", "{what}");
        assert_eq!(parent.exit_code(), 0, "{what}");
        assert!(!name_has_owner(&bus.address, &name), "{what}");
    }
}

/// A guard released in the PARENT after `fork`, while the child keeps its copy: the child still
/// holds the lock through the open file description they shared, so the parent's release must
/// leave the file in place. A second copy is refused (its record names the parent, now
/// releasing or gone), the file is still there, and once the child exits a new copy acquires.
#[test]
fn a_guard_released_in_the_parent_after_fork_leaves_the_lock_file_to_the_child() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("fork_parent");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let mut cmd = clean_command(&example_path("fork_release"), None, lock_dir.path());
    cmd.args([&name, "--parent-drops"]);
    let mut parent = Proc::spawn(cmd);
    let acquired = parent.next_line("acquired");
    assert!(acquired.starts_with("acquired"), "{acquired}");
    let released = parent.next_line("the parent's release");
    assert!(released.starts_with("parent-released"), "{released}");
    assert!(
        path.exists(),
        "the parent's release removed the lock file its child still holds"
    );
    let mut second = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let line = second.next_line("the second copy");
    assert!(
        line.starts_with("already-running"),
        "a copy acquired beside the child that holds the lock: {line}"
    );
    assert_eq!(second.exit_code(), 75);
    assert!(path.exists(), "the lock file is gone while the child holds");
    // The child waits on the stdin it shares with the parent.
    parent.close_stdin();
    assert_eq!(
        parent.next_line("the child's exit"),
        "child-exited status=0"
    );
    assert_eq!(parent.exit_code(), 0);
    let mut third = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let line = third.next_line("the third copy");
    assert!(line.starts_with("acquired"), "{line}");
}

/// Another thread of the holder's process starting a program at the moment of the release: from
/// its `fork` to its `exec` the child shares every descriptor of ours, the lock's included, so
/// the lock is briefly held through another open file description. That is not a forked child
/// that lives on: the release waits it out and removes the file as always. (It once left the
/// file behind whenever a spawn coincided; the test suite's own parallel spawns showed it.)
#[test]
#[allow(unsafe_code)]
fn a_program_started_by_another_thread_during_the_release_does_not_keep_the_file() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("spawn_at_release");
    let path = dir.path().join("spawn.lock");
    let guard = unique_instance::InstanceOptions::new(&name)
        .backend(unique_instance::Backend::LockFile)
        .lock_file(&path)
        .acquire()
        .expect("acquire");
    let (mut forked, tell) = std::io::pipe().expect("pipe");
    let tell_fd = tell.as_raw_fd();
    let mut cmd = std::process::Command::new("true");
    // SAFETY: between fork and exec only `write` and `nanosleep` (async-signal-safe) are called.
    unsafe {
        cmd.pre_exec(move || {
            let tell = std::os::fd::BorrowedFd::borrow_raw(tell_fd);
            rustix::io::write(tell, b"f")?;
            // Holding copies of the parent's descriptors, the lock's among them, a while.
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(())
        });
    }
    let spawner = std::thread::spawn(move || cmd.status());
    let mut byte = [0u8; 1];
    forked.read_exact(&mut byte).expect("the child forked");
    drop(tell);
    guard.release().expect("release");
    assert!(
        !path.exists(),
        "the release left the lock file to a program that was only being started"
    );
    let status = spawner.join().expect("join").expect("spawn");
    assert!(status.success());
}
