//! A private bus for unit tests, and the tests of the connection's own socket.

use std::sync::atomic::Ordering;
use std::time::Duration;

use zbus::fdo::{RequestNameFlags, RequestNameReply};

use super::connect::connect_to;
use super::{Connected, DBUS_NAME, DBUS_PATH, request_name_reply};

/// A private `dbus-daemon` for unit tests, killed on drop.
pub(crate) struct PrivateBus {
    child: std::process::Child,
    pub(crate) address: zbus::Address,
    _dir: std::path::PathBuf,
}

impl PrivateBus {
    pub(crate) fn start() -> Self {
        use std::io::BufRead;
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "unique-instance-unit-bus-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::create_dir_all(&dir);
        let mut child = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:dir={}", dir.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("`dbus-daemon` is needed: apt-get install -y dbus");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address");
        let address = line.trim().parse().expect("bus address");
        PrivateBus {
            child,
            address,
            _dir: dir,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects, owning `name` when given.
    pub(crate) async fn connect(&self, name: Option<&str>) -> Connected {
        let mut connected = connect_to(
            self.address.clone(),
            Vec::new(),
            name.map(|n| (n, RequestNameFlags::DO_NOT_QUEUE)),
        )
        .await
        .expect("connect");
        if let Some(serial) = connected.pending_request {
            let reply = request_name_reply(&mut connected.stream, serial)
                .await
                .expect("RequestName");
            assert_eq!(reply, RequestNameReply::PrimaryOwner);
        }
        connected
    }

    pub(crate) async fn has_owner(&self, name: &str) -> bool {
        let other = self.connect(None).await;
        other
            .conn
            .call_method(
                Some(DBUS_NAME),
                DBUS_PATH,
                Some(DBUS_NAME),
                "NameHasOwner",
                &(name,),
            )
            .await
            .expect("NameHasOwner")
            .body()
            .deserialize::<bool>()
            .expect("reply")
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Our own socket halves report the bus's credentials from the kernel, as zbus's do.
#[tokio::test]
async fn our_socket_knows_the_bus_credentials() {
    let bus = PrivateBus::start();
    let connected = bus.connect(None).await;
    assert!(connected.disconnect.is_some(), "not our own socket");
    let creds = connected.conn.peer_creds().await.expect("peer_creds");
    assert_eq!(creds.process_id(), Some(bus.pid()));
    assert_eq!(
        creds.unix_user_id(),
        Some(rustix::process::getuid().as_raw())
    );
}

/// `Disconnect::wait` returns once the bus dropped us: the name is free by then, while
/// the runtime that owns the connection does not run.
#[test]
fn a_disconnect_frees_the_name_without_the_runtime() {
    let bus = PrivateBus::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let name = "org.uniqueinstance.Unit.Disconnect";
    let connected = rt.block_on(bus.connect(Some(name)));
    let disconnect = connected.disconnect.expect("our own socket");
    disconnect.wait(Duration::from_secs(5)).expect("disconnect");
    let checker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(!checker.block_on(bus.has_owner(name)));
    drop(connected.conn);
}
