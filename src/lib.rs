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
#![forbid(unsafe_code)]
#![doc = ""]
#![doc = include_str!("../README.md")]

mod dbus;
mod error;
// For the fuzz targets in fuzz/ and the tests that replay their inputs; see src/fuzzing.rs.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod holder;
mod lockfile;
mod loss;
mod name;
mod notify;
mod options;
mod runtime;
mod scope;
mod status;

pub use error::{Error, Result, UnsafeLockPath};
pub use guard::InstanceGuard;
pub use holder::{BackendKind, Holder, format_rfc3339};
pub use lockfile::network_fs_name;
pub use loss::{Loss, LossReason, LossWatcher};
pub use name::{InstanceName, MAX_NAME_LEN, NameRule};
pub use options::{InstanceOptions, Plan, Wait};
pub use scope::{Backend, BusKind, LOCK_DIR_ENV, SCOPE_ENV, SYSTEM_LOCK_DIR, Scope};
pub use status::{Status, status};

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
pub async fn ensure_single_instance_async(name: &str) -> Result<InstanceGuard> {
    InstanceOptions::new(name).acquire_async().await
}
