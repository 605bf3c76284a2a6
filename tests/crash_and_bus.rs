//! Crashes, a dying bus, and copies that see different environments.

mod common;

use common::{BusConfig, DbusDaemon, cli, field, holder, unique_name};

/// SIGKILL the holder: the next copy acquires at once, with no clean-up by anyone. Repeated,
/// because the bus may still list the dead holder for a moment after the kernel dropped its lock.
#[test]
fn next_copy_acquires_at_once_after_holder_is_sigkilled() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("crash");
    let mut current = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let first = current.next_line("first holder");
    assert!(first.starts_with("acquired"), "{first}");
    for round in 0..10 {
        current.sigkill();
        let mut next = holder(Some(&bus.address), lock_dir.path(), &[&name]);
        let line = next.next_line("next holder");
        assert!(line.starts_with("acquired"), "round {round}: {line}");
        assert!(
            line.contains("LockFile") && line.contains("Dbus"),
            "round {round}: {line}"
        );
        current = next;
    }
    // The stale record of the killed holder was replaced: a contender names the live one.
    let mut contender = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let line = contender.next_line("contender");
    assert_eq!(
        field(&line, "holder_pid"),
        Some(current.pid().to_string().as_str()),
        "{line}"
    );
    assert_eq!(contender.exit_code(), 75);
}

/// Kill the bus under a holder: the guard reports the loss, the lock file still excludes.
#[test]
fn bus_death_is_reported_and_the_lock_file_still_excludes() {
    let mut bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("busdies");
    for mode in [&[][..], &["--blocking"][..]] {
        let mut args = vec![name.as_str()];
        args.extend_from_slice(mode);
        let mut h = holder(Some(&bus.address), lock_dir.path(), &args);
        assert!(h.next_line("holder").starts_with("acquired"));
        bus.kill();
        let loss = h.line_starting("lost");
        assert_eq!(
            loss, "lost reason=BusConnectionClosed still_exclusive=true",
            "{mode:?}"
        );

        // A copy pointed at the dead bus, and one with no bus at all: both refused by the lock.
        for env_bus in [Some(bus.address.as_str()), None] {
            let mut other = holder(env_bus, lock_dir.path(), &[&name]);
            let line = other.next_line("contender");
            assert!(line.starts_with("already-running"), "{env_bus:?}: {line}");
            assert_eq!(
                field(&line, "holder_pid"),
                Some(h.pid().to_string().as_str())
            );
            assert_eq!(other.exit_code(), 75);
        }
        h.close_stdin();
        assert_eq!(h.line_starting("released"), "released");
        assert_eq!(h.exit_code(), 0);
        bus = DbusDaemon::start(BusConfig::Open);
    }
}

/// A holder whose bus died, and a bus restarted at the same address where another process
/// owns the name (unique names start again from the first one on a new bus): the holder's
/// record no longer names a connection on the bus, so `status` does not take the two for one
/// process, and refused copies do not say the holder is on the bus.
#[test]
fn after_a_bus_restart_the_old_holder_is_not_taken_for_the_new_owner() {
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("unix:path={}", socket_dir.path().join("bus").display());
    let auth = "<auth>EXTERNAL</auth>";
    let mut bus = DbusDaemon::start_listening(BusConfig::Open, "", Some(&listen), auth);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("restart");
    let mut a = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let acquired = a.next_line("first holder");
    assert!(acquired.contains("Dbus"), "{acquired}");
    bus.kill();
    assert_eq!(
        a.line_starting("lost"),
        "lost reason=BusConnectionClosed still_exclusive=true"
    );
    let bus = DbusDaemon::start_listening(BusConfig::Open, "", Some(&listen), auth);
    let mut b = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    let acquired = b.next_line("bus-only holder");
    assert!(acquired.starts_with("acquired"), "{acquired}");

    let mut status = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let line = status.next_line("status --json");
    assert_eq!(status.exit_code(), 0, "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("status --json is JSON");
    assert_eq!(v["lock_file_holder"]["pid"], a.pid(), "{v}");
    assert_eq!(v["bus_owner"]["pid"], b.pid(), "{v}");
    assert_eq!(v["holders_differ"], true, "{v}");
    assert_eq!(v["pid"], b.pid(), "{v}");

    let mut c = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let refused = c.next_line("contender");
    assert_eq!(
        field(&refused, "holder_pid"),
        Some(a.pid().to_string().as_str()),
        "{refused}"
    );
    assert!(!refused.contains("on the session bus"), "{refused}");
    assert_eq!(c.exit_code(), 75);
}

/// A holder that lost its lock file to a copy of it renamed over (and, still alive, keeps its
/// bus name) refuses the next copy at once: that copy takes the new file, whose record
/// names the live holder, and is refused by the bus. The grace for a dead previous holder's
/// connection, which the bus has not dropped yet, is not for a holder that lives (a review:
/// every such copy waited 5 s in the bus's queue, the lock file held, before it was refused).
#[test]
fn a_live_previous_holder_on_the_bus_refuses_at_once() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("live_previous");
    let mut a = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    assert!(a.next_line("holder").starts_with("acquired"));
    let path = lock_dir.path().join(format!("{name}.lock"));
    let copy = lock_dir.path().join("copy");
    std::fs::copy(&path, &copy).expect("copy the lock file");
    std::fs::rename(&copy, &path).expect("rename the copy over it");
    let lost = a.line_starting("lost");
    assert_eq!(field(&lost, "reason"), Some("LockFileReplaced"), "{lost}");
    let mut cmd = common::clean_command(
        &common::example_path("holder"),
        Some(&bus.address),
        lock_dir.path(),
    );
    cmd.arg(&name).env("RUST_LOG", "unique_instance=debug");
    let mut b = common::Proc::spawn(cmd);
    let refused = b.next_line("second copy");
    assert!(refused.starts_with("already-running"), "{refused}");
    assert_eq!(
        field(&refused, "holder_pid"),
        Some(a.pid().to_string().as_str()),
        "{refused}"
    );
    assert_eq!(b.exit_code(), 75);
    let waited: Vec<String> = b
        .stderr_until_closed()
        .into_iter()
        .filter(|l| l.contains("waiting for the bus to drop a dead holder"))
        .collect();
    assert!(waited.is_empty(), "queued for a live holder: {waited:?}");
    a.close_stdin();
    assert_eq!(a.exit_code(), 0);
}

/// A holder with the bus and a contender without one, and the reverse: refused both ways.
#[test]
fn mixed_environments_exclude_each_other() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let cases: [(Option<&str>, Option<&str>); 2] =
        [(Some(&bus.address), None), (None, Some(&bus.address))];
    for (holder_bus, contender_bus) in cases {
        let name = unique_name("mixed");
        let mut h = holder(holder_bus, lock_dir.path(), &[&name]);
        let acquired = h.next_line("holder");
        assert!(acquired.starts_with("acquired"), "{acquired}");
        assert_eq!(
            acquired.contains("Dbus"),
            holder_bus.is_some(),
            "{acquired}"
        );
        let mut c = holder(contender_bus, lock_dir.path(), &[&name]);
        let line = c.next_line("contender");
        assert!(
            line.starts_with("already-running"),
            "holder bus {holder_bus:?}, contender bus {contender_bus:?}: {line}"
        );
        assert_eq!(
            field(&line, "holder_pid"),
            Some(h.pid().to_string().as_str())
        );
        assert_eq!(c.exit_code(), 75);
    }
}

/// A bus whose policy denies ownership: not permitted (77), never "already running", nothing
/// runs, and the lock file taken first is given back.
#[test]
fn policy_denial_is_not_permitted_and_nothing_runs() {
    let bus = DbusDaemon::start(BusConfig::DenyOwn);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("policy");
    for backend in ["auto", "dbus"] {
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        let line = h.next_line("outcome");
        assert!(line.starts_with("not-permitted"), "{backend}: {line}");
        assert!(line.contains("bus policy"), "{backend}: {line}");
        assert_eq!(h.exit_code(), 77);
        assert!(!h.seen.iter().any(|l| l.starts_with("acquired")));
    }
    // The lock file was released: a lock-file-only copy gets it.
    let mut after = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    assert!(after.next_line("lockfile copy").starts_with("acquired"));
}

/// The kernel released the lock, but the bus still lists the previous lock holder as the name's
/// owner (its disconnect not yet processed). Made exactly: a process acquires the name alone and
/// exits at once, leaving it to its forked child, which keeps the connection's socket open (as
/// `run`'s keeper keeps a killed wrapper's); the lock file holds a record naming the exited
/// process, unlocked. The newcomer must queue for the name instead of refusing, and get it the
/// moment the old connection goes.
#[test]
fn newcomer_waits_for_the_bus_to_drop_the_previous_lock_holder() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("deadowner");
    // The process that made the connection is gone; its child keeps the connection.
    let mut old = common::dead_holder_on_the_bus(&bus.address, lock_dir.path(), &name);

    let mut newcomer = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    // Queued behind the old owner: it neither refused nor took the name.
    common::wait_for_queued_owners(&bus.address, &name, 2);
    assert_eq!(
        newcomer.try_line(std::time::Duration::ZERO),
        None,
        "the newcomer must wait for the old owner, not refuse or take it"
    );
    // The child ends with its stdin, and the connection with it.
    old.close_stdin();
    let line = newcomer.next_line("newcomer");
    assert!(line.starts_with("acquired"), "{line}");
    assert!(line.contains("Dbus"), "{line}");
}

/// The same newcomer, waiting (`--wait`): queued at once behind the dead holder's connection,
/// it is about to run, and does not mark itself in its record as waiting behind another owner;
/// a copy refused meanwhile names it, not the dead connection (a review saw "holder unknown, as
/// :1.0" named, since the mark sent refused copies to the bus).
#[test]
fn a_waiting_newcomer_behind_a_dead_holder_is_named_as_the_running_copy() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("deadowner_wait");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let mut old = common::dead_holder_on_the_bus(&bus.address, lock_dir.path(), &name);
    let mut cmd = common::clean_command(
        &common::example_path("holder"),
        Some(&bus.address),
        lock_dir.path(),
    );
    cmd.args([name.as_str(), "--wait", "forever"]);
    common::arm_test_hook(&mut cmd, "UNIQUE_INSTANCE_TEST_STOP_IN_BUS_QUEUE");
    let mut newcomer = common::Proc::spawn(cmd);
    // In the queue, past whatever it records of it.
    newcomer.stopped_at("in the bus's queue");
    let text = std::fs::read_to_string(&path).expect("the newcomer's record");
    let record: serde_json::Value = serde_json::from_str(&text).expect("a JSON record");
    assert_eq!(record["pid"], newcomer.pid(), "{record}");
    assert!(record.get("queued_on_bus").is_none(), "{record}");
    let mut third = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let line = third.next_line("a copy refused meanwhile");
    assert!(line.starts_with("already-running"), "{line}");
    assert_eq!(
        field(&line, "holder_pid"),
        Some(newcomer.pid().to_string().as_str()),
        "{line}"
    );
    assert_eq!(third.exit_code(), 75);
    newcomer.signal(rustix::process::Signal::CONT);
    old.close_stdin();
    let line = newcomer.next_line("newcomer");
    assert!(line.starts_with("acquired"), "{line}");
    newcomer.close_stdin();
    assert_eq!(newcomer.exit_code(), 0);
}

/// The D-Bus backend alone, with no bus configured or a dead one: no usable backend (69),
/// never an unguarded success.
#[test]
fn dbus_backend_without_a_bus_is_no_usable_backend() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let mut dead = DbusDaemon::start(BusConfig::Open);
    dead.kill();
    for bus in [None, Some(dead.address.as_str())] {
        let name = unique_name("nobackend");
        let mut h = holder(bus, lock_dir.path(), &[&name, "--backend", "dbus"]);
        let line = h.next_line("outcome");
        assert!(line.starts_with("no-usable-backend"), "{bus:?}: {line}");
        assert_eq!(h.exit_code(), 69);
    }
}

/// Auto with no bus, or an unreachable one: the lock file alone enforces, and says so at warn.
#[test]
fn lock_file_alone_is_announced_at_warn() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let mut dead = DbusDaemon::start(BusConfig::Open);
    dead.kill();
    for (bus, expected) in [
        (
            None,
            "no D-Bus bus is configured; the lock file alone enforces exclusion",
        ),
        (
            Some(dead.address.as_str()),
            "bus is unreachable; the lock file alone enforces exclusion",
        ),
    ] {
        let name = unique_name("alone");
        let mut h = holder(bus, lock_dir.path(), &[&name]);
        let line = h.next_line("holder");
        assert!(
            line.starts_with("acquired") && line.contains("backends=[LockFile]"),
            "{line}"
        );
        h.close_stdin();
        assert_eq!(h.exit_code(), 0);
        let stderr = h.stderr_until_closed();
        assert!(
            stderr
                .iter()
                .any(|l| l.contains("WARN") && l.contains(expected)),
            "{bus:?}: no warn line {expected:?} in {stderr:?}"
        );
    }
}

/// A guard from the blocking API, dropped inside another runtime's task: no panic, and both the
/// name and the lock file are free afterwards.
#[test]
fn blocking_guard_dropped_inside_a_runtime_releases_cleanly() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("dropinrt");
    let mut h = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--blocking", "--drop-in-runtime"],
    );
    let line = h.next_line("holder");
    assert!(line.contains("backends=[LockFile, Dbus]"), "{line}");
    h.close_stdin();
    assert_eq!(h.line_starting("released"), "released");
    assert_eq!(h.exit_code(), 0, "stderr: {:?}", h.stderr_until_closed());
    assert_eq!(
        std::fs::read_dir(lock_dir.path()).expect("ls").count(),
        0,
        "lock file removed"
    );
    for backend in ["dbus", "lockfile"] {
        let mut next = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(
            next.next_line("next").starts_with("acquired"),
            "{backend} still held"
        );
    }
}

/// A bus that accepts connections but answers nothing (stopped, deadlocked): a copy must not
/// hang on it. The connection is given up after a bound, and the lock file alone enforces
/// exclusion (with the D-Bus backend alone: no usable backend). A bounded wait for a running
/// copy ends at its own deadline, not when the frozen bus would have answered.
#[test]
fn a_frozen_bus_delays_but_never_hangs_a_copy() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("frozen");
    bus.freeze(true);
    let thaw = Thaw(&bus);

    let mut first = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let line = first.next_line("holder beside a frozen bus");
    assert!(line.starts_with("acquired"), "{line}");
    assert!(
        line.contains("LockFile") && !line.contains("Dbus"),
        "the frozen bus cannot be part of it: {line}"
    );

    // Waiting up to a second for the running copy: refused as timed out, although the frozen
    // bus never completes the connection made meanwhile.
    let mut waiter = holder(Some(&bus.address), lock_dir.path(), &[&name, "--wait", "1"]);
    let line = waiter.next_line("bounded waiter");
    assert!(line.starts_with("timed-out"), "{line}");
    assert_eq!(
        field(&line, "holder_pid"),
        Some(first.pid().to_string().as_str()),
        "{line}"
    );
    assert_eq!(waiter.exit_code(), 75);

    // The D-Bus backend alone has nothing left: a clear "no usable backend".
    let mut dbus_only = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&unique_name("frozen_dbus"), "--backend", "dbus"],
    );
    let line = dbus_only.next_line("dbus-only copy");
    assert!(line.starts_with("no-usable-backend"), "{line}");
    assert_eq!(dbus_only.exit_code(), 69);

    drop(thaw);
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
    assert_eq!(first.exit_code(), 0);
}

/// A copy waiting in the bus's queue whose wait ends while the bus is frozen says so at its
/// deadline, holder unknown, rather than when two more calls to the frozen bus time out (a
/// review: a 2 s wait ended after 52 s). The bus stays frozen until the copy has answered.
#[test]
fn a_wait_in_the_queue_of_a_bus_that_freezes_ends_at_its_deadline() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("frozen_queue");
    let mut first = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    assert!(first.next_line("holder").starts_with("acquired"));
    let mut waiter = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus", "--wait", "1"],
    );
    common::wait_for_queued_owners(&bus.address, &name, 2);
    bus.freeze(true);
    let thaw = Thaw(&bus);
    // Its second, and a margin for a loaded machine; the calls it made before took 25 s each.
    let line = waiter.try_line(std::time::Duration::from_secs(15));
    drop(thaw);
    let line = line.expect("the waiter did not answer while the bus was frozen");
    assert!(line.starts_with("timed-out"), "{line}");
    assert_eq!(waiter.exit_code(), 75);
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
}

/// Resumes a frozen bus however the test ends, so its drop can kill it.
struct Thaw<'a>(&'a DbusDaemon);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.freeze(false);
    }
}
