//! The bus connection over each transport: a socket file and an abstract socket (where
//! `RequestName` goes out with the handshake, in one write), and TCP (where zbus authenticates and
//! the name is requested after `Hello`). And, since the request is pipelined, that objects served
//! with `serve_at` answer the very first call made the moment the name appears.

mod common;

use common::{BusConfig, DbusDaemon, TIMEOUT, example_path, field, holder, unique_name};
use futures_util::StreamExt;

/// A first copy owns the name on `bus`; a second is refused and names the first: by PID, or,
/// where the bus cannot know PIDs (TCP), by its unique name.
fn one_holder_and_a_refused_copy(bus: &DbusDaemon, test: &str, bus_knows_pids: bool) {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name(test);
    let mut first = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    let line = first.line_starting("acquired");
    assert!(line.contains("bus=Some(Session)"), "{line}");
    let mut second = holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    let refused = second.next_line("the second copy's outcome");
    assert!(refused.starts_with("already-running"), "{refused}");
    if bus_knows_pids {
        assert_eq!(
            field(&refused, "holder_pid"),
            Some(first.pid().to_string().as_str()),
            "{refused}"
        );
    } else {
        let unique = field(&line, "unique").expect("the holder's unique name");
        assert!(refused.contains(&format!("as {unique}")), "{refused}");
        assert_eq!(field(&refused, "holder_pid"), Some("unknown"), "{refused}");
    }
    assert_eq!(second.exit_code(), 75);
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
    assert_eq!(first.exit_code(), 0);
}

#[test]
fn abstract_unix_socket() {
    let listen = format!(
        "unix:abstract=/unique-instance-test/{}",
        unique_name("abstract")
    );
    let bus =
        DbusDaemon::start_listening(BusConfig::Open, "", Some(&listen), "<auth>EXTERNAL</auth>");
    assert!(bus.address.starts_with("unix:abstract="), "{}", bus.address);
    one_holder_and_a_refused_copy(&bus, "abstract", true);
}

#[test]
fn tcp_without_pipelining() {
    let bus = DbusDaemon::start_listening(
        BusConfig::Open,
        "",
        Some("tcp:host=127.0.0.1,bind=127.0.0.1,port=0"),
        "<auth>ANONYMOUS</auth><allow_anonymous/>",
    );
    assert!(bus.address.starts_with("tcp:"), "{}", bus.address);
    one_holder_and_a_refused_copy(&bus, "tcp", false);
}

/// Over TCP zbus makes the socket, so `run` has no bus socket to hand its keeper: with the bus
/// name alone nothing holds the instance once the wrapper is gone, and the keeper kills COMMAND
/// at once (SIGKILL), even one that ignores SIGTERM, rather than let it run beside a new copy.
#[test]
fn tcp_run_with_the_bus_alone_kills_command_at_once_when_the_wrapper_dies() {
    let bus = DbusDaemon::start_listening(
        BusConfig::Open,
        "",
        Some("tcp:host=127.0.0.1,bind=127.0.0.1,port=0"),
        "<auth>ANONYMOUS</auth><allow_anonymous/>",
    );
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("tcp_run");
    let mut wrapper = common::cli(
        Some(&bus.address),
        lock_dir.path(),
        &[
            "run",
            "--backend",
            "dbus",
            "--kill-after",
            "600",
            &name,
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo pid $$; while :; do sleep 1; done",
        ],
    );
    let line = wrapper.line_starting("pid ");
    let pid: i32 = line["pid ".len()..]
        .parse()
        .unwrap_or_else(|_| panic!("bad line {line:?}"));
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
        .unwrap_or_else(|| panic!("COMMAND (pid {pid}) is not running"));
    wrapper.sigkill();
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: TIMEOUT.as_secs() as i64,
        tv_nsec: 0,
    };
    let exited = rustix::event::poll(&mut fds, Some(&timeout)).expect("poll") == 1;
    if !exited {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    }
    assert!(
        exited,
        "COMMAND (pid {pid}), which ignores SIGTERM, still runs {TIMEOUT:?} after the wrapper of \
         a bus-only instance on a TCP bus was killed: it ran unguarded beside any new copy"
    );
}

/// Watches for the name to get an owner and calls the example server's `Ping` at once: the
/// object was exported before the name was requested, so the call must be answered (not
/// `UnknownObject`), even though the request left with the handshake.
#[tokio::test]
async fn exported_objects_answer_the_moment_the_name_appears() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("connect to the test bus");
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("bus proxy");
    for round in 0..10 {
        let name = unique_name("exported");
        let mut owners = dbus
            .receive_name_owner_changed_with_args(&[(0, name.as_str())])
            .await
            .expect("subscribe to NameOwnerChanged");
        let mut server = std::process::Command::new(example_path("server"));
        server
            .arg(&name)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("UNIQUE_INSTANCE_LOCK_DIR", lock_dir.path())
            .env("RUST_LOG", "off");
        let mut server = common::Proc::spawn(server);
        let appeared = tokio::time::timeout(TIMEOUT, owners.next())
            .await
            .expect("the server took the name in time")
            .expect("signal stream");
        let args = appeared.args().expect("NameOwnerChanged arguments");
        let owner = args.new_owner().as_ref().expect("a new owner").to_string();
        let reply = conn
            .call_method(
                Some(owner.as_str()),
                "/org/example/Server",
                Some("org.example.Server1"),
                "Ping",
                &(),
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: the first call failed: {e}"));
        let pong: String = reply.body().deserialize().expect("a string");
        assert_eq!(pong, format!("pong from {name}"), "round {round}");
        // Stopped once it is serving: it must exit cleanly, releasing the name.
        server.line_starting("ready");
        server.signal(rustix::process::Signal::TERM);
        assert_eq!(server.exit_code(), 0, "round {round}");
    }
}
