//! Who holds an instance, asked without taking anything.

use std::path::PathBuf;

use crate::dbus;
use crate::error::Result;
use crate::holder::Holder;
use crate::lockfile;
use crate::options::InstanceOptions;
use crate::scope::BusKind;

/// The answer of [`status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The instance name.
    pub name: String,
    /// What is known of the running copy; `None` when nothing holds the instance.
    pub holder: Option<Holder>,
    /// The lock file that was examined, if any.
    pub lock_file: Option<PathBuf>,
    /// The bus that was asked, if one was reachable.
    pub bus: Option<BusKind>,
}

impl Status {
    /// True when a copy holds the instance through any backend.
    pub fn is_running(&self) -> bool {
        self.holder.is_some()
    }
}

/// Reports who holds the instance `options` describe, creating and locking nothing: the lock
/// file's lock is tested without being taken, on a read-only descriptor, and the bus is asked
/// for the name's owner.
///
/// # Errors
///
/// [`crate::Error::InvalidName`] and the planning errors of [`InstanceOptions::plan`];
/// [`crate::Error::UnsafeLockPath`] when the lock path is a symlink; [`crate::Error::Io`] when
/// the lock file cannot be examined.
pub async fn status(options: &InstanceOptions) -> Result<Status> {
    let plan = options.plan()?;
    let mut holder = None;
    if let Some(path) = &plan.lock_file {
        holder = lockfile::holder_of(path)?;
    }
    let mut bus_asked = None;
    if let Some(kind) = plan.bus {
        match dbus::connect(kind, Vec::new(), None).await {
            Ok(dbus::Connected { conn, .. }) => {
                bus_asked = Some(kind);
                let owner = dbus::owner_of(&conn, &plan.name, kind).await;
                if owner.bus_unique_name.is_some() {
                    holder = Some(merge(holder, owner));
                }
            }
            Err(e) => {
                tracing::warn!(bus = %kind, error = %e, "cannot reach the bus; reporting the lock file only")
            }
        }
    }
    Ok(Status {
        name: plan.name,
        holder,
        lock_file: plan.lock_file,
        bus: bus_asked,
    })
}

/// The lock file's record and the bus's answer, combined; the bus wins where both speak.
fn merge(from_lock: Option<Holder>, from_bus: Holder) -> Holder {
    let Some(lock) = from_lock else {
        return from_bus;
    };
    Holder {
        pid: from_bus.pid.or(lock.pid),
        uid: from_bus.uid.or(lock.uid),
        since: from_bus.since.or(lock.since),
        found_by: from_bus.found_by,
        bus: from_bus.bus,
        bus_unique_name: from_bus.bus_unique_name,
        executable: from_bus.executable.or(lock.executable),
        hostname: lock.hostname,
        lock_file: lock.lock_file,
    }
}
