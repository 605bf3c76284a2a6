//! Replacement on the bus, and waiting for a running copy to exit.

mod common;

use std::time::{Duration, Instant};

use common::{
    BusConfig, DbusDaemon, Proc, clean_command, example_path, field, holder, unique_name,
};
use zbus::fdo::{RequestNameFlags, RequestNameReply};

async fn request(
    address: &str,
    name: &str,
    flags: RequestNameFlags,
) -> (zbus::Connection, RequestNameReply) {
    let conn = zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect");
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
    (conn, reply)
}

/// Takes `name` from `holder` (`REPLACE_EXISTING`) on a connection of its own, returned, and
/// waits until the holder says it was replaced, not exclusive any more.
async fn replace(address: &str, name: &str, mut holder: Proc) -> (zbus::Connection, Proc) {
    let flags = RequestNameFlags::REPLACE_EXISTING | RequestNameFlags::DO_NOT_QUEUE;
    let (conn, reply) = request(address, name, flags).await;
    assert_eq!(reply, RequestNameReply::PrimaryOwner);
    let (line, holder) =
        tokio::task::spawn_blocking(move || (holder.line_starting("lost"), holder))
            .await
            .expect("join");
    assert_eq!(line, "lost reason=Replaced still_exclusive=false");
    (conn, holder)
}

#[tokio::test]
async fn holder_that_allows_replacement_reports_replaced() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("replace");
    let mut h = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--allow-replacement"],
    );
    assert!(h.next_line("holder").starts_with("acquired"));
    let (_conn, _h) = replace(&bus.address, &name, h).await;
}

/// A copy replaced on the bus, whose lock file is still held, is not exclusive any more: when
/// the bus then dies, that loss is no more exclusive than the replacement was, though the lock
/// file is verified then (the audit made it claim exclusion and no test failed).
#[tokio::test]
async fn a_bus_dying_after_a_replacement_is_no_exclusive_loss() {
    let mut bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("replaced_then_dead");
    let mut h = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--allow-replacement"],
    );
    let line = h.next_line("holder");
    assert!(
        line.starts_with("acquired") && line.contains("LockFile") && line.contains("Dbus"),
        "{line}"
    );
    let (conn, mut h) = replace(&bus.address, &name, h).await;
    drop(conn);
    bus.kill();
    let (line, mut h) = tokio::task::spawn_blocking(move || (h.line_starting("lost"), h))
        .await
        .expect("join");
    assert_eq!(
        line,
        "lost reason=BusConnectionClosed still_exclusive=false"
    );
    h.close_stdin();
    h.stdout_until_closed();
}

/// The owner of `name` on `conn`'s bus, `None` when it has none.
async fn owner(conn: &zbus::Connection, name: &str) -> Option<String> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetNameOwner",
            &(name,),
        )
        .await;
    match reply {
        Ok(reply) => Some(reply.body().deserialize::<String>().expect("owner")),
        Err(e) if e.to_string().contains("NameHasNoOwner") => None,
        Err(e) => panic!("GetNameOwner: {e}"),
    }
}

/// A copy that allows replacement and acquired with a wait (so without `DO_NOT_QUEUE`) is, once
/// replaced, out of the bus's queue: when the replacer leaves, the name is free, not handed back
/// to the copy that was told it had lost it (a review: it owned the name again, with
/// `is_exclusive()` false, and other copies were refused, naming it). When the name was free at
/// once, when the copy waited in the queue for it, and when a copy that does not wait queued
/// briefly behind a dead holder the bus had not yet dropped (another review: that copy kept
/// the queueing flags it asked with then, and was handed the name back).
#[tokio::test]
async fn a_replaced_copy_is_not_handed_the_name_back() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for queued_first in ["no", "behind a copy", "behind a dead holder"] {
        let name = unique_name("not_back");
        let first = match queued_first {
            "no" => None,
            "behind a copy" => {
                let mut first = holder(
                    Some(&bus.address),
                    lock_dir.path(),
                    &[&name, "--backend", "dbus"],
                );
                assert!(first.next_line("first").starts_with("acquired"));
                Some(first)
            }
            _ => Some(common::dead_holder_on_the_bus(
                &bus.address,
                lock_dir.path(),
                &name,
            )),
        };
        let args: &[&str] = match queued_first {
            "behind a dead holder" => &[&name, "--allow-replacement"],
            _ => &[
                &name,
                "--backend",
                "dbus",
                "--allow-replacement",
                "--wait",
                "30",
            ],
        };
        let mut h = holder(Some(&bus.address), lock_dir.path(), args);
        if let Some(mut first) = first {
            let (address, queued) = (bus.address.clone(), name.clone());
            tokio::task::spawn_blocking(move || {
                common::wait_for_queued_owners(&address, &queued, 2)
            })
            .await
            .expect("join");
            first.close_stdin();
            if queued_first == "behind a copy" {
                assert_eq!(first.line_starting("released"), "released");
            }
        }
        assert!(
            h.next_line("holder").starts_with("acquired"),
            "queued_first={queued_first}"
        );
        let (conn, mut h) = replace(&bus.address, &name, h).await;
        let released = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "ReleaseName",
                &(name.as_str(),),
            )
            .await
            .expect("ReleaseName");
        assert_eq!(released.body().deserialize::<u32>().expect("reply"), 1);
        assert_eq!(
            owner(&conn, &name).await,
            None,
            "queued_first={queued_first}: the replaced copy got the name back"
        );
        h.close_stdin();
        h.stdout_until_closed();
    }
}

#[tokio::test]
async fn holder_that_does_not_allow_replacement_keeps_the_name() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("noreplace");
    let mut h = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let acquired = h.next_line("holder");
    let unique = field(&acquired, "unique").expect("unique name").to_owned();
    let flags = RequestNameFlags::REPLACE_EXISTING | RequestNameFlags::DO_NOT_QUEUE;
    let (conn, reply) = request(&bus.address, &name, flags).await;
    assert_eq!(reply, RequestNameReply::Exists);
    let owner = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetNameOwner",
            &(name.as_str(),),
        )
        .await
        .expect("GetNameOwner")
        .body()
        .deserialize::<String>()
        .expect("owner");
    assert_eq!(owner, unique);
}

#[test]
fn waiter_takes_over_when_the_holder_exits_or_dies() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for (backend, kill) in [
        ("auto", false),
        ("auto", true),
        ("dbus", false),
        ("dbus", true),
        ("lockfile", true),
    ] {
        let name = unique_name("wait");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(h.next_line("holder").starts_with("acquired"), "{backend}");
        let mut waiter =
            clean_command(&example_path("holder"), Some(&bus.address), lock_dir.path());
        waiter
            .args([&name, "--backend", backend, "--wait", "forever"])
            .env("RUST_LOG", "info");
        let mut w = Proc::spawn(waiter);
        // Known to wait (queued on the bus, or waiting for the lock file, as it says) ...
        if backend == "dbus" {
            common::wait_for_queued_owners(&bus.address, &name, 2);
        } else {
            w.stderr_line_containing("waiting for the running copy to exit");
        }
        // ... and not in while the holder lives.
        assert_eq!(
            w.try_line(Duration::ZERO),
            None,
            "{backend}: waiter got in early"
        );
        if kill {
            h.sigkill();
        } else {
            h.close_stdin();
            assert_eq!(h.line_starting("released"), "released");
        }
        let line = w.next_line("waiter takes over");
        assert!(
            line.starts_with("acquired"),
            "{backend} kill={kill}: {line}"
        );
        // And it really holds it now.
        let mut c = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        let refused = c.next_line("contender");
        assert_eq!(
            field(&refused, "holder_pid"),
            Some(w.pid().to_string().as_str()),
            "{refused}"
        );
    }
}

#[test]
fn bounded_wait_times_out_with_the_timeout_error() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for backend in ["auto", "dbus", "lockfile"] {
        let name = unique_name("timeout");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(h.next_line("holder").starts_with("acquired"));
        let started = Instant::now();
        let mut w = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend, "--wait", "0.5"],
        );
        let line = w.next_line("waiter gives up");
        assert!(line.starts_with("timed-out"), "{backend}: {line}");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{backend}: gave up early"
        );
        assert_eq!(
            field(&line, "holder_pid"),
            Some(h.pid().to_string().as_str()),
            "{line}"
        );
        assert_eq!(w.exit_code(), 75);
        // The holder is untouched, and the timed-out waiter left nothing behind in the queue.
        h.close_stdin();
        assert_eq!(h.line_starting("released"), "released");
        let mut next = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(next.next_line("next").starts_with("acquired"), "{backend}");
    }
}

/// A copy that holds the lock file and only waits in the bus's queue for the name (its owner
/// uses the bus alone) does not own the name: its record says the lock file alone until the
/// name is granted, and copies refused meanwhile do not name it as on the bus; once it owns
/// the name, the record says so.
#[test]
fn a_queued_waiter_does_not_record_the_bus_name_before_it_owns_it() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("queued");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let mut h = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    assert!(h.next_line("holder").starts_with("acquired"));
    let mut w = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--wait", "forever"],
    );
    // Queued: the bus lists it after the owner (it holds the lock file before it asks).
    let deadline = Instant::now() + common::TIMEOUT;
    while common::queued_owners(&bus.address, &name).len() < 2 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        assert_eq!(
            w.try_line(Duration::from_millis(20)),
            None,
            "waiter got in early"
        );
    }
    let record = queued_record(&path);
    assert_eq!(record["pid"], w.pid(), "{record}");
    assert_eq!(
        record["bus_unique_name"],
        serde_json::Value::Null,
        "{record}"
    );
    assert_eq!(record["bus"], serde_json::Value::Null, "{record}");
    assert_eq!(record["queued_on_bus"]["bus"], "session", "{record}");
    // A copy that cannot ask the bus is told the holder only waits, not that it runs.
    let mut c = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let refused = c.next_line("contender");
    assert!(refused.starts_with("already-running"), "{refused}");
    assert_eq!(
        field(&refused, "holder_pid"),
        Some(w.pid().to_string().as_str()),
        "{refused}"
    );
    assert!(
        !refused.contains(", on the session bus"),
        "named as on the bus: {refused}"
    );
    assert!(
        refused.contains("only waits in the session bus's queue for the name"),
        "not said to wait: {refused}"
    );
    assert_eq!(c.exit_code(), 75);

    h.close_stdin();
    assert_eq!(h.line_starting("released"), "released");
    let acquired = w.next_line("waiter takes over");
    assert!(acquired.starts_with("acquired"), "{acquired}");
    let unique = field(&acquired, "unique").expect("unique name");
    let record = std::fs::read_to_string(&path).expect("the record");
    let record: serde_json::Value = serde_json::from_str(&record).expect("a JSON record");
    assert_eq!(record["bus_unique_name"], unique, "{record}");
    assert_eq!(record["bus"], "session", "{record}");
    assert_eq!(record["queued_on_bus"], serde_json::Value::Null, "{record}");
}

/// The record at `path` once it says its holder waits in a bus's queue (written right after
/// the bus answers that it queued it, so a moment after the bus lists it). Panics after
/// [`common::TIMEOUT`].
fn queued_record(path: &std::path::Path) -> serde_json::Value {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).expect("the waiter's record");
        let record: serde_json::Value = serde_json::from_str(&text).expect("a JSON record");
        if !record["queued_on_bus"].is_null() {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "the record never said its holder waits: {record}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A copy owning `name` on the bus at `address` alone (`--backend dbus`), and one with both
/// backends that waits: it holds the lock file in `lock_dir` and waits in the bus's queue, its
/// record saying so. Returns the owner, its unique name, the waiter, and the lock file's path.
fn runner_and_queued_waiter(
    address: &str,
    lock_dir: &std::path::Path,
    name: &str,
) -> (Proc, String, Proc, std::path::PathBuf) {
    let path = lock_dir.join(format!("{name}.lock"));
    let mut runner = holder(Some(address), lock_dir, &[name, "--backend", "dbus"]);
    let line = runner.next_line("the name's owner");
    assert!(line.starts_with("acquired"), "{line}");
    let unique = field(&line, "unique")
        .expect("the owner's unique name")
        .to_owned();
    let waiter = holder(Some(address), lock_dir, &[name, "--wait", "forever"]);
    common::wait_for_queued_owners(address, name, 2);
    queued_record(&path);
    (runner, unique, waiter, path)
}

/// A program that owns the name alone (`--backend dbus`, or one using the bus without a lock
/// file) runs; a copy with both backends that waits takes the lock file and waits in the bus's
/// queue. Copies refused by the lock file then, by a plain attempt or a timed-out wait, the
/// library's and `run`, name the one running, the name's owner, not the copy that only waits (a
/// review found them naming the waiter, with its start time, as the running copy).
#[test]
fn a_refusal_names_the_names_owner_not_a_copy_waiting_behind_it() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("waiter_named");
    let (mut runner, _, mut waiter, _) =
        runner_and_queued_waiter(&bus.address, lock_dir.path(), &name);
    let names_the_runner = |line: &str, what: &str| {
        assert_eq!(
            field(line, "holder_pid"),
            Some(runner.pid().to_string().as_str()),
            "{what} did not name the running copy (the waiter is {}): {line}",
            waiter.pid()
        );
        assert!(!line.contains("waits in the"), "{line}");
    };
    // The library, refused at once, and after a wait.
    let mut third = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let line = third.next_line("the third copy");
    assert!(line.starts_with("already-running"), "{line}");
    names_the_runner(&line, "a plain attempt");
    assert_eq!(third.exit_code(), 75);
    let mut fourth = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--wait", "0.3"],
    );
    let line = fourth.next_line("a copy that waits briefly");
    assert!(line.starts_with("timed-out"), "{line}");
    names_the_runner(&line, "a timed-out wait");
    assert_eq!(fourth.exit_code(), 75);
    // `run`.
    let mut cli = common::cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "true"],
    );
    let stderr = cli.stderr_until_closed().join("\n");
    assert_eq!(cli.exit_code(), 75, "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {}", runner.pid())),
        "run did not name the running copy (the waiter is {}): {stderr}",
        waiter.pid()
    );
    // `status`: the name's owner runs; the lock file's holder is another process, which waits.
    let mut status = common::cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let line = status.next_line("status --json");
    assert_eq!(status.exit_code(), 0, "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("status --json is JSON");
    assert_eq!(v["pid"], runner.pid(), "{v}");
    assert_eq!(v["queued_on_bus"], serde_json::Value::Null, "{v}");
    assert_eq!(v["lock_file_holder"]["pid"], waiter.pid(), "{v}");
    assert_eq!(v["lock_file_holder"]["queued_on_bus"], "session", "{v}");
    runner.close_stdin();
    assert_eq!(runner.exit_code(), 0);
    let line = waiter.next_line("the waiter, once the name is free");
    assert!(line.starts_with("acquired"), "{line}");
    waiter.close_stdin();
    assert_eq!(waiter.exit_code(), 0);
}

/// A copy waiting in the bus's queue when the bus dies holds the instance through its lock file
/// alone, and runs: its record no longer says it waits (a refused copy would be told it does
/// not run yet).
#[test]
fn a_waiter_whose_bus_dies_is_no_longer_recorded_as_waiting() {
    let mut bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("queue_gone");
    let (runner, _, mut waiter, path) =
        runner_and_queued_waiter(&bus.address, lock_dir.path(), &name);
    bus.kill();
    let line = waiter.next_line("the waiter, its bus gone");
    assert!(line.starts_with("acquired"), "{line}");
    let text = std::fs::read_to_string(&path).expect("the record");
    let record: serde_json::Value = serde_json::from_str(&text).expect("a JSON record");
    assert_eq!(record["pid"], waiter.pid(), "{record}");
    assert_eq!(record["queued_on_bus"], serde_json::Value::Null, "{record}");
    let mut refused = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let line = refused.next_line("a copy refused by the lock file");
    assert!(line.starts_with("already-running"), "{line}");
    assert!(!line.contains("waits in the"), "{line}");
    assert_eq!(refused.exit_code(), 75);
    waiter.close_stdin();
    assert_eq!(waiter.exit_code(), 0);
    drop(runner);
}

/// The same over TCP, where the bus cannot say which process owns the name: a refused copy
/// names the owner by its unique name ("holder unknown" for the PID), never the waiter's PID
/// (a review: a script acting on that PID would pick the wrong process).
#[test]
fn tcp_refusals_name_the_owner_by_its_unique_name_not_the_waiters_pid() {
    let bus = DbusDaemon::start_listening(
        BusConfig::Open,
        "",
        Some("tcp:host=127.0.0.1,bind=127.0.0.1,port=0"),
        "<auth>ANONYMOUS</auth><allow_anonymous/>",
    );
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("waiter_named_tcp");
    let (mut runner, unique, mut waiter, _) =
        runner_and_queued_waiter(&bus.address, lock_dir.path(), &name);
    let mut third = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    let line = third.next_line("the third copy");
    assert!(line.starts_with("already-running"), "{line}");
    assert_eq!(field(&line, "holder_pid"), Some("unknown"), "{line}");
    assert!(line.contains(&format!("as {unique}")), "{line}");
    assert!(!line.contains("waits in the"), "{line}");
    assert_eq!(third.exit_code(), 75);
    runner.close_stdin();
    assert_eq!(runner.exit_code(), 0);
    let line = waiter.next_line("the waiter, once the name is free");
    assert!(line.starts_with("acquired"), "{line}");
    waiter.close_stdin();
    assert_eq!(waiter.exit_code(), 0);
}
