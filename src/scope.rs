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

/// A mechanism that enforces exclusion: what an instance holds
/// ([`InstanceGuard::backends`](crate::InstanceGuard::backends)), what a holder was found
/// through ([`Holder::found_by`](crate::Holder::found_by)), and what
/// [`InstanceOptions::backend`](crate::InstanceOptions::backend) restricts an acquisition to.
/// By default an acquisition uses every backend that applies: the lock file always, then the
/// bus name when a bus is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Backend {
    /// A D-Bus well-known name. Alone, an acquisition fails when no bus is reachable, and it
    /// keeps out only copies that reach the same bus: with the scope left to the environment, a
    /// copy started from a login session (its session bus) and one started as a service (the
    /// system bus) both run. The lock file, held as well by default, is what keeps copies on one
    /// machine apart whatever bus they see.
    Dbus,
    /// A lock file.
    LockFile,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Dbus => "dbus",
            Backend::LockFile => "lock-file",
        })
    }
}

/// Which backends an acquisition uses: every one that applies (the default), or only the one
/// [`InstanceOptions::backend`](crate::InstanceOptions::backend) chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendSelection {
    /// The lock file always, then the bus name when a bus is available.
    Auto,
    /// This backend alone.
    Only(Backend),
}

impl BackendSelection {
    /// Whether `backend` is part of the selection.
    pub(crate) fn uses(self, backend: Backend) -> bool {
        match self {
            BackendSelection::Auto => true,
            BackendSelection::Only(only) => only == backend,
        }
    }
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
