//! Guarantee at most one running copy of a program, and tell the second copy who is running.
//!
//! ```no_run
//! match unique_instance::ensure_single_instance("org.example.Server") {
//!     Ok(guard) => {
//!         // ... the server runs; dropping `guard` releases the instance ...
//!         # drop(guard);
//!     }
//!     Err(unique_instance::Error::AlreadyRunning { holder, .. }) => {
//!         eprintln!("already running as pid {:?}", holder.pid);
//!         std::process::exit(75);
//!     }
//!     Err(e) => panic!("{e}"),
//! }
//! ```
//!
//! By default an instance holds **both** a lock file (always: cheap, local, the ground truth on
//! this machine) and a D-Bus well-known name (when a bus is available), so copies started from a
//! terminal, cron, a systemd unit or CI exclude each other whatever each can see. See
//! [`InstanceOptions`] for scopes, backends, waiting and loss notification.
// Denied (Cargo.toml's lints) but not forbidden: one function, `lockfile/held.rs`'s `refer_to`
// (`dup3` onto a descriptor the lock lends out), allows it.
#![doc = ""]
#![doc = include_str!("../README.md")]

mod acquire;
mod dbus;
mod error;
// For the fuzz targets in fuzz/ and the tests that replay their inputs; see src/fuzzing.rs.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod held;
mod holder;
mod lockfile;
mod loss;
mod name;
mod notify;
mod options;
mod plan;
mod recreation;
mod runtime;
mod scope;
mod status;
mod test_hooks;

pub use error::{Error, Result, UnsafeLockPath};
pub use guard::InstanceGuard;
pub use holder::Holder;
pub use lockfile::{
    HandedLockFile, HandedLockState, record_this_process_as_holder,
    record_this_process_as_holder_keeping_bus_name,
};
pub use loss::{Loss, LossReason, LossWatcher};
pub use name::{InstanceName, NameRule};
pub use options::{InstanceOptions, Wait};
pub use plan::Plan;
pub use recreation::LockFileRecreations;
pub use scope::{Backend, BusKind, LOCK_DIR_ENV, SCOPE_ENV, Scope};
pub use status::{Status, status};
/// The D-Bus crate this one is built on, at the version its API uses:
/// [`InstanceGuard::connection`], [`InstanceOptions::serve_at`] and [`Error::Bus`] speak its
/// types, so a program serving its objects needs no second, possibly different, zbus.
///
/// ```no_run
/// use unique_instance::zbus;
///
/// let guard = unique_instance::ensure_single_instance("org.example.Server")?;
/// let connection: Option<&zbus::Connection> = guard.connection();
/// # drop(connection);
/// # Ok::<(), unique_instance::Error>(())
/// ```
pub use zbus;

// For the lock file module (src/lockfile/probe.rs, and dir.rs's tests).
pub(crate) use plan::SYSTEM_LOCK_DIR;

/// Makes this process the only running copy of `name` in the default (Auto) scope, blocking.
///
/// # Errors
///
/// [`Error::AlreadyRunning`] when another copy holds it, naming that copy; see
/// [`InstanceOptions::acquire`] for the rest.
pub fn ensure_single_instance(name: &str) -> Result<InstanceGuard> {
    InstanceOptions::new(name).acquire()
}

/// Async form of [`ensure_single_instance`], for tokio programs.
///
/// # Errors
///
/// As [`ensure_single_instance`].
///
/// # Panics
///
/// As [`InstanceOptions::acquire_async`]: it needs a tokio runtime with its I/O and time
/// drivers.
pub async fn ensure_single_instance_async(name: &str) -> Result<InstanceGuard> {
    InstanceOptions::new(name).acquire_async().await
}
