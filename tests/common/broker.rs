//! A private `dbus-broker` in place of the private `dbus-daemon`, for the tests' second pass
//! (`UNIQUE_INSTANCE_TEST_BUS=dbus-broker`, run by `scripts/test`).
//!
//! `dbus-broker-launch` has no `--print-address` and ignores `<listen>`: it serves only the one
//! socket handed to it by socket activation, logs only to the journal, and connects to the bus
//! it runs (its "user" or "system" bus) to reach systemd. So, without systemd:
//! - the test binds the listening socket and hands it over as fd 3 with `LISTEN_FDS=1` and
//!   `LISTEN_PID` (set by the shell that then `exec`s the launcher, so the PID is the launcher's);
//! - the launcher's `DBUS_SESSION_BUS_ADDRESS` / `DBUS_SYSTEM_BUS_ADDRESS` is that socket;
//! - readiness is `READY=1` on a `NOTIFY_SOCKET` the test binds, then one `GetId` round trip
//!   (the launcher sends `READY=1` even when its configuration failed to load);
//! - as root, the launcher runs in a private mount namespace where a socket of the test's is
//!   mounted at `/run/systemd/journal/socket`, so its log reaches the failure message (without
//!   that socket it refuses to start). Not root: the host's journal must exist.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{DbusDaemon, TIMEOUT, line_channel, require_program, status_within_timeout};

/// The bus implementation the tests start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusImplementation {
    /// The reference `dbus-daemon` (the default).
    DbusDaemon,
    /// `dbus-broker`, through `dbus-broker-launch`.
    DbusBroker,
}

/// `UNIQUE_INSTANCE_TEST_BUS`: unset or `dbus-daemon` (the default), or `dbus-broker`. Anything
/// else is a mistake in the test run and fails the test, rather than silently testing the
/// default.
pub fn bus_implementation() -> BusImplementation {
    match std::env::var("UNIQUE_INSTANCE_TEST_BUS") {
        Err(std::env::VarError::NotPresent) => BusImplementation::DbusDaemon,
        Ok(v) if v.is_empty() || v == "dbus-daemon" => BusImplementation::DbusDaemon,
        Ok(v) if v == "dbus-broker" => BusImplementation::DbusBroker,
        Ok(other) => {
            panic!("UNIQUE_INSTANCE_TEST_BUS={other:?}: expected `dbus-daemon` or `dbus-broker`")
        }
        Err(e) => panic!("UNIQUE_INSTANCE_TEST_BUS: {e}: expected `dbus-daemon` or `dbus-broker`"),
    }
}

/// What a running broker needs besides its launcher's `Child`.
pub(super) struct Broker {
    log: Arc<Mutex<Vec<String>>>,
    journal: UnixDatagram,
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Wakes the log reader's `recv`, so its thread ends with the bus.
        let _ = self.journal.shutdown(std::net::Shutdown::Both);
    }
}

/// SIGKILLs the process group `pid` leads (a launcher and its broker).
pub(super) fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

const SCRIPT: &str = r#"set -e
if [ -n "$UI_TEST_JOURNAL" ]; then
    # Private mount namespace: nothing here is seen outside it.
    t=/run/systemd; [ -d "$t" ] || t=/run
    mount -t tmpfs -o mode=0755 unique-instance-test "$t"
    mkdir -p /run/systemd/journal
    : > /run/systemd/journal/socket
    mount --bind "$UI_TEST_JOURNAL" /run/systemd/journal/socket
fi
exec 3<&0 </dev/null
export LISTEN_FDS=1 LISTEN_PID=$$
exec "$UI_TEST_LAUNCHER" --scope "$UI_TEST_SCOPE" --config-file "$UI_TEST_CONFIG"
"#;

/// Starts a broker with configuration `conf`, serving `listen` (a `unix:path=` or
/// `unix:abstract=` address), as a session-like (`system` false) or system-like bus.
pub(super) fn start(
    dir: tempfile::TempDir,
    conf: &str,
    listen: &str,
    auth: &str,
    system: bool,
) -> DbusDaemon {
    let launcher = require_program("dbus-broker-launch", "dbus-broker");
    let sh = require_program("sh", "dash");
    assert_eq!(
        auth.trim(),
        "<auth>EXTERNAL</auth>",
        "dbus-broker authenticates only with EXTERNAL; a test needing {auth:?} is excluded from \
         the dbus-broker pass in scripts/test"
    );
    let listener = bind(listen);
    let conf_path = dir.path().join("bus.conf");
    std::fs::write(&conf_path, conf).expect("write bus config");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the NOTIFY_SOCKET");
    let root = rustix::process::geteuid().is_root();
    let journal_path = dir.path().join("journal");
    let journal = UnixDatagram::bind(&journal_path).expect("bind the journal socket");
    let log = collect_log(journal.try_clone().expect("clone the journal socket"));

    let mut cmd = if root {
        let unshare = require_program("unshare", "util-linux");
        require_program("mount", "mount");
        let mut cmd = Command::new(unshare);
        cmd.args(["--mount", "--propagation", "private", "--"])
            .arg(&sh);
        cmd.env("UI_TEST_JOURNAL", &journal_path);
        cmd
    } else {
        Command::new(&sh)
    };
    let bus_variable = if system {
        "DBUS_SYSTEM_BUS_ADDRESS"
    } else {
        "DBUS_SESSION_BUS_ADDRESS"
    };
    cmd.arg("-c")
        .arg(SCRIPT)
        .env_remove("LISTEN_FDNAMES")
        .env("UI_TEST_LAUNCHER", &launcher)
        .env("UI_TEST_SCOPE", if system { "system" } else { "user" })
        .env("UI_TEST_CONFIG", &conf_path)
        .env("NOTIFY_SOCKET", &notify_path)
        // The launcher talks to systemd over the bus it runs, as on a real machine.
        .env(bus_variable, listen)
        // Its own group: `kill` takes the launcher and the broker it forks in one signal.
        .process_group(0)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let stderr = line_channel(child.stderr.take().expect("stderr"));
    let mut bus = DbusDaemon {
        child,
        address: listen.to_owned(),
        broker: Some(Broker { log, journal }),
        _dir: dir,
    };
    let failed = |bus: &mut DbusDaemon, what: String| -> ! {
        bus.kill();
        let log = bus
            .broker
            .as_ref()
            .map(|b| b.log.lock().map(|l| l.clone()).unwrap_or_default());
        panic!(
            "dbus-broker: {what}; launcher stderr: {:?}; its log: {:?}",
            stderr.try_iter().collect::<Vec<_>>(),
            log.unwrap_or_default()
        );
    };
    if let Err(e) = wait_ready(&notify) {
        failed(&mut bus, e);
    }
    let mut check = Command::new(require_program("dbus-send", "dbus-bin"));
    check
        .arg(format!("--bus={listen}"))
        .args(["--print-reply", "--reply-timeout=20000"])
        .args(["--dest=org.freedesktop.DBus", "/org/freedesktop/DBus"])
        .arg("org.freedesktop.DBus.GetId")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = status_within_timeout(check);
    if !status.success() {
        failed(&mut bus, format!("ready, but GetId failed: {status}"));
    }
    bus
}

/// The listening socket for `listen`, reachable by every user (as `dbus-daemon` makes it).
fn bind(listen: &str) -> UnixListener {
    if let Some(path) = listen.strip_prefix("unix:path=") {
        // A broker started again on the same address (a bus restart): the socket of the one
        // before is still there, as dbus-daemon would have removed its own.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path).unwrap_or_else(|e| panic!("remove the old {path}: {e}"));
        }
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {path}: {e}"));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        listener
    } else if let Some(name) = listen.strip_prefix("unix:abstract=") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract socket address");
        UnixListener::bind_addr(&addr).unwrap_or_else(|e| panic!("bind @{name}: {e}"))
    } else {
        panic!(
            "dbus-broker serves only a Unix socket it is handed, not {listen:?}; a test needing \
             it is excluded from the dbus-broker pass in scripts/test"
        )
    }
}

/// Waits for `READY=1` on `notify`, within [`TIMEOUT`].
fn wait_ready(notify: &UnixDatagram) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no READY=1 within {TIMEOUT:?}"));
        }
        notify
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        match notify.recv(&mut buf) {
            Ok(n) => {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no READY=1 within {TIMEOUT:?}"));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading NOTIFY_SOCKET: {e}")),
        }
    }
}

/// Keeps the `MESSAGE=` fields of the journal datagrams the launcher and broker send.
fn collect_log(socket: UnixDatagram) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = socket.recv(&mut buf) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(message) = text.lines().find_map(|l| l.strip_prefix("MESSAGE="))
                && let Ok(mut log) = kept.lock()
            {
                log.push(message.to_owned());
            }
        }
    });
    log
}
