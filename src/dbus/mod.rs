//! The D-Bus backend, its whole protocol: connect (`connect`, on our own socket halves in
//! `socket`, whose read half lets through only what zbus can read: `frame`), own the
//! well-known name with explicit flags and name its owner (`name`), watch it once owned
//! (`watch`) and give it back (`release`), in as few round trips as the protocol allows.
//! It must not plan (`plan`) nor order the backends (`acquire`).

mod connect;
mod frame;
mod name;
mod release;
mod socket;
#[cfg(test)]
pub(crate) mod tests;
mod watch;

use std::time::Duration;

pub(crate) use connect::{Connected, Disconnect, Export, connect};
#[cfg(test)]
use name::request_name_reply;
pub(crate) use name::{own_name, owner_of_or_unknown, release_name, request_flags};
pub(crate) use release::HeldName;
pub(crate) use watch::watch_bus;

const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// How long a method call to the bus daemon may take before we give up on it.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(25);
