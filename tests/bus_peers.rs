//! What other programs on the bus can send a copy's connection (any local user may send a
//! unicast signal on a stock system bus): none of it is a loss, ends a wait, or stalls an
//! acquisition. After each flood the copy's connection is pinged (`org.freedesktop.DBus.Peer`,
//! which zbus answers on every connection): its answer comes after every message sent before
//! it, so the copy has read them all, and is still connected, when the test looks at its output
//! (the holders serve an object, `--serve`, so that zbus answers).

mod common;

use std::time::{Duration, Instant};

use common::{
    BusConfig, DbusDaemon, Proc, clean_command, example_path, field, holder, unique_name,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect")
}

/// The unique name of the connection process `pid` made to the bus, once it has made one (up to
/// [`common::TIMEOUT`]).
async fn unique_name_of(peer: &zbus::Connection, pid: u32) -> String {
    let dbus = zbus::fdo::DBusProxy::new(peer).await.expect("proxy");
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        for name in dbus.list_names().await.expect("ListNames") {
            if name.starts_with(':')
                && let Ok(bus_name) = zbus::names::BusName::try_from(name.as_str())
                && dbus.get_connection_unix_process_id(bus_name).await.ok() == Some(pid)
            {
                return name.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never connected to the bus"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `count` unicast signals `INTERFACE.MEMBER(arg)` to `to`.
async fn signals(
    peer: &zbus::Connection,
    to: &str,
    interface: &str,
    member: &str,
    arg: &str,
    count: usize,
) {
    for _ in 0..count {
        peer.emit_signal(
            Some(to),
            "/org/freedesktop/DBus",
            interface,
            member,
            &(arg,),
        )
        .await
        .expect("emit");
    }
}

/// Pings `to`: once it answers, it has read everything sent to it before, and is connected.
async fn ping(peer: &zbus::Connection, to: &str, what: &str) {
    let answered = tokio::time::timeout(
        common::TIMEOUT,
        peer.call_method(
            Some(to),
            "/org/example/Holder",
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        ),
    )
    .await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "{what}: the copy's connection no longer answers: {answered:?}"
    );
}

/// Ends a holder that must have said nothing since it acquired: its next line is its release.
fn released_without_a_word(mut h: Proc, what: &str) {
    h.close_stdin();
    let line = h.next_line("released");
    assert_eq!(line, "released", "{what}; stderr: {:?}", h.stderr_lines());
    assert_eq!(h.exit_code(), 0, "{what}");
}

/// Signals that carry file descriptors, from a peer, to a copy with the common soft limit of
/// 1024 descriptors (a review: zbus kept 64 unread messages' descriptors open, 16 each, the
/// table filled, the next message's were truncated, and the connection was closed: a loss of
/// the name with nothing taking it, which with the bus alone stops `run`'s COMMAND).
#[test]
fn descriptors_sent_by_a_peer_are_not_a_loss() {
    use std::os::unix::process::CommandExt;
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("fd_flood");
    let mut cmd = clean_command(&example_path("holder"), Some(&bus.address), lock_dir.path());
    cmd.args([name.as_str(), "--backend", "dbus", "--serve"]);
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    #[allow(unsafe_code)]
    // SAFETY: setrlimit is async-signal-safe, and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let limit = rustix::process::Rlimit {
                current: Some(1024),
                maximum: hard,
            };
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
    let mut h = Proc::spawn(cmd);
    let line = h.next_line("holder");
    assert!(line.starts_with("acquired"), "{line}");
    let unique = field(&line, "unique").expect("unique name").to_owned();
    runtime().block_on(async {
        let peer = connect(&bus.address).await;
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let fds: Vec<zbus::Fd<'_>> = (0..16)
            .map(|_| zbus::Fd::from(std::os::fd::AsFd::as_fd(&null)))
            .collect();
        for _ in 0..400 {
            // dbus-broker drops a sender past its quota of descriptors in flight: the copy
            // then gets what was sent until then, and is pinged from another connection.
            let sent = peer
                .emit_signal(
                    Some(unique.as_str()),
                    "/x",
                    "org.example.Any",
                    "Fds",
                    &(&fds,),
                )
                .await;
            if sent.is_err() {
                break;
            }
        }
        let pinger = connect(&bus.address).await;
        ping(&pinger, &unique, "after signals with 16 descriptors each").await;
    });
    released_without_a_word(h, "a peer's descriptors were taken for a loss");
}

/// A copy that waits for the lock file connects to the bus meanwhile, and a peer sends that
/// connection a few hundred signals before the holder leaves (a review: nothing read that
/// connection until the lock file was taken, zbus stopped reading at 64 queued messages, the
/// reply to `RequestName` was never read, and after 25 s the copy ran on the lock file alone,
/// the name unowned, saying the bus had gone away).
#[test]
fn a_waiting_copy_sent_signals_meanwhile_still_owns_the_name() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("flooded_waiter");
    let mut first = holder(Some(&bus.address), lock_dir.path(), &[&name]);
    assert!(first.next_line("holder").starts_with("acquired"));
    let mut waiter = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--wait", "120"],
    );
    let waiter_pid = waiter.pid();
    runtime().block_on(async {
        let peer = connect(&bus.address).await;
        let unique = unique_name_of(&peer, waiter_pid).await;
        signals(&peer, &unique, "org.example.Any", "Ping", "x", 200).await;
        // The bus handles a peer's messages in order: once it has answered this, it has queued
        // the signals for the waiter. (Not a ping of the waiter: a copy that serves objects
        // makes no connection ahead.)
        unique_name_of(&peer, waiter_pid).await;
    });
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
    let line = waiter.line_starting("acquired");
    assert!(
        line.contains("Dbus"),
        "the waiter acquired without the bus name: {line}; stderr: {:?}",
        waiter.stderr_lines()
    );
    released_without_a_word(waiter, "the waiter");
}

/// A peer's `NameLost` for our name, sent as the bus's own (interface, path, member) to the
/// holder: the bus stamps the peer as its sender, and it is not a loss.
#[test]
fn a_name_lost_sent_by_a_peer_is_not_a_loss() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for backend in ["auto", "dbus"] {
        let name = unique_name("spoofed_lost");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend, "--serve"],
        );
        let line = h.next_line("holder");
        assert!(line.starts_with("acquired"), "{backend}: {line}");
        let unique = field(&line, "unique").expect("unique name").to_owned();
        runtime().block_on(async {
            let peer = connect(&bus.address).await;
            signals(&peer, &unique, "org.freedesktop.DBus", "NameLost", &name, 5).await;
            ping(&peer, &unique, backend).await;
        });
        released_without_a_word(
            h,
            &format!("{backend}: a peer's NameLost was taken for a loss"),
        );
    }
}

/// A peer's `NameAcquired` to a copy queued for the name (the bus alone, `--wait`) does not end
/// its wait: it gets the name when the holder leaves, not before.
#[test]
fn a_name_acquired_sent_by_a_peer_does_not_end_a_wait() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("spoofed_acquired");
    let mut first = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    assert!(first.next_line("holder").starts_with("acquired"));
    let mut waiter = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus", "--wait", "120", "--serve"],
    );
    common::wait_for_queued_owners(&bus.address, &name, 2);
    let queued = common::queued_owners(&bus.address, &name);
    runtime().block_on(async {
        let peer = connect(&bus.address).await;
        signals(
            &peer,
            &queued[1],
            "org.freedesktop.DBus",
            "NameAcquired",
            &name,
            3,
        )
        .await;
        ping(&peer, &queued[1], "the queued copy").await;
    });
    // Still queued behind the holder: the bus's own list says so, whatever the copy believes,
    // and the copy has said nothing (looked at without waiting: a control, which passes
    // before the pump as after it).
    assert_eq!(common::queued_owners(&bus.address, &name).len(), 2);
    assert_eq!(
        waiter.try_line(Duration::ZERO),
        None,
        "a peer's NameAcquired ended the wait"
    );
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
    let line = waiter.next_line("the waiter");
    assert!(
        line.starts_with("acquired") && line.contains("Dbus"),
        "{line}"
    );
    released_without_a_word(waiter, "the waiter");
}
