//! The public choices of how far and by what an instance is unique (`Scope`, `Backend`, `BusKind`)
//! and the names of the environment variables that set them; `plan` resolves them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How far uniqueness reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Scope {
    /// One instance per user: the session bus, and a lock directory chosen from the UID alone
    /// (`/run/lock/unique-instance-UID/`, else `/tmp/unique-instance-UID/`; mode 0700, verified).
    User,
    /// One instance per machine: the system bus, and `/run/unique-instance/NAME/` when a
    /// deployment made that directory, else the shared `/run/lock/unique-instance/`.
    System,
    /// The lock file follows who you are (System for root, User otherwise); the bus follows the
    /// environment (session bus if configured, else the system bus under systemd or system bus
    /// activation, else none).
    #[default]
    Auto,
}

/// Which mechanisms enforce exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// Both: the lock file always, then the bus name when a bus is available.
    #[default]
    Auto,
    /// The D-Bus name only. Fails when no bus is reachable.
    Dbus,
    /// The lock file only.
    LockFile,
}

/// Which message bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BusKind {
    /// The user's session bus.
    Session,
    /// The machine's system bus.
    System,
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Session => "session",
            BusKind::System => "system",
        })
    }
}

/// The environment variable that points the lock directory elsewhere (tests, sandboxes).
///
/// Every copy that should exclude the others must see the same value.
pub const LOCK_DIR_ENV: &str = "UNIQUE_INSTANCE_LOCK_DIR";

/// The environment variable that sets the scope of a program that did not choose one in code
/// ([`crate::InstanceOptions::scope`]): `user`, `system` or `auto`.
///
/// It is how a deployment tells a server that calls [`crate::ensure_single_instance`] what it
/// is: the system unit that `unique-instance generate` writes sets `UNIQUE_INSTANCE_SCOPE=system`,
/// so a service running under its own `User=` takes its lock file in the system scope's
/// directory (its own `/run/unique-instance/NAME/`, else the shared one), where a copy started by
/// hand meets it. Any other value is an
/// error ([`crate::Error::InvalidEnvironment`]), never a guess.
pub const SCOPE_ENV: &str = "UNIQUE_INSTANCE_SCOPE";
