//! Giving the name back: `ReleaseName`, as well as the runtime the release runs in allows.
//! It must not release anything but the name (the guard orders the backends' releases).

use std::time::Duration;

use zbus::Connection;

use super::release_name;
use crate::error::{Error, Result};
use crate::scope::BusKind;

/// Releases the name of a connection whose socket zbus made itself (a transport other than a
/// Unix socket), as well as the runtime we are in allows.
pub(crate) fn release_without_socket(kind: BusKind, conn: Connection, name: &str) -> Result<()> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(release_bus(kind, conn, name)))
        }
        Ok(_) => {
            // Cannot wait here: closing the connection makes the bus release the name as soon
            // as it notices.
            drop(conn);
            Ok(())
        }
        Err(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(release_bus(kind, conn, name)),
            Err(_) => {
                drop(conn);
                Ok(())
            }
        },
    }
}

pub(crate) async fn release_bus(kind: BusKind, conn: Connection, name: &str) -> Result<()> {
    // Test hook (debug builds only): stop here, so that a test can kill the bus at this moment.
    static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    crate::lockfile::stop_for_test("UNIQUE_INSTANCE_TEST_STOP_BEFORE_RELEASE_NAME", &STOPPED);
    if conn.is_closed() {
        return Ok(());
    }
    let result = tokio::time::timeout(Duration::from_secs(5), release_name(&conn, name)).await;
    match result {
        Ok(Ok(())) => Ok(()),
        // The connection broke under the call (the bus died or dropped us): a name never
        // outlives its connection, so it is released as asked. (A bus that does not answer is
        // not this: that is the timeout below.)
        Ok(Err(zbus::Error::InputOutput(e)))
            if conn.is_closed()
                || matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::NotConnected
                ) =>
        {
            tracing::debug!(name, error = %e, "the bus connection ended as the name was released");
            Ok(())
        }
        Ok(Err(source)) => Err(Error::Bus {
            context: "cannot release the name",
            bus: kind,
            source,
        }),
        Err(_) => Err(Error::Bus {
            context: "cannot release the name",
            bus: kind,
            source: zbus::Error::Failure("the bus did not answer ReleaseName within 5 s".into()),
        }),
    }
}
