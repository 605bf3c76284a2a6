//! Who holds an instance, asked without taking anything.

use std::path::PathBuf;

use crate::dbus;
use crate::error::{Error, Result};
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
    /// What is known of the running copy; `None` when nothing holds the instance. When the bus
    /// name and the lock file are held by the same process, what both say of it; when by two
    /// different processes (see [`Status::holders_differ`]), the bus name's owner, and
    /// [`Status::lock_file_holder`] tells who holds the lock file.
    pub holder: Option<Holder>,
    /// The lock file that was examined, if any.
    pub lock_file: Option<PathBuf>,
    /// The bus that was asked, if one was reachable.
    pub bus: Option<BusKind>,
    /// Who holds the lock file, from its record; `None` when it is not held (or was not
    /// examined).
    pub lock_file_holder: Option<Holder>,
    /// Who owns the bus name; `None` when it is not owned (or no bus was asked).
    pub bus_owner: Option<Holder>,
}

impl Status {
    /// True when a copy holds the instance through any backend.
    pub fn is_running(&self) -> bool {
        self.holder.is_some()
    }

    /// True when the bus name and the lock file are both held, by two processes known to be
    /// different (by the bus's answer and the lock file's record). Something other than one
    /// copy of this instance holds one of them: a program using the name with another lock
    /// file, or with the bus alone. When the record names no process, neither this nor the
    /// contrary is known, and [`Status::holder`] is the bus name's owner alone.
    pub fn holders_differ(&self) -> bool {
        match (&self.lock_file_holder, &self.bus_owner) {
            (Some(lock), Some(bus)) => !lock.is_unknown() && !same_process(lock, bus),
            _ => false,
        }
    }
}

/// Reports who holds the instance `options` describe, creating and locking nothing: the lock
/// file's lock is tested without being taken, on a read-only descriptor, and the bus is asked
/// for the name's owner.
///
/// # Errors
///
/// [`crate::Error::InvalidName`] and the planning errors of [`InstanceOptions::plan`];
/// [`crate::Error::UnsafeLockPath`] and [`crate::Error::NotALockFile`] when the lock path
/// names a file an acquisition would refuse (a symlink or anything else that is not a regular
/// file, never opened; or, held by nobody, a file with more than one name or one that is not a
/// lock file), rather than reporting it free;
/// [`crate::Error::NotPermitted`] when this process may not open the lock file (or search its
/// directory); [`crate::Error::Io`] when the lock file cannot be examined otherwise;
/// [`crate::Error::NoUsableBackend`] when nothing could be checked: no lock file is planned
/// (`Backend::Dbus`) and the bus cannot be reached.
///
/// # Panics
///
/// As [`InstanceOptions::acquire_async`]: it needs a tokio runtime with its I/O and time
/// drivers.
pub async fn status(options: &InstanceOptions) -> Result<Status> {
    let plan = options.plan()?;
    let lock_plan = options.resolve()?.2;
    let mut round = 0;
    let (lock_file_holder, bus_owner, bus_asked) = loop {
        let lock_file_holder = lock_file_holder_now(&plan, lock_plan.as_ref()).await?;
        crate::test_hooks::stop_at(crate::test_hooks::Hook::StatusBeforeAskingTheBus);
        let (bus_owner, bus_asked) = bus_owner_now(&plan).await?;
        // The lock file and the bus are asked one after the other: a copy that let go of both
        // in between, and the next one that took both, look like two holders at once (a
        // review counted 34 in 1 345 answers under churn). Held by one process throughout the
        // bus's answer, the lock file names the same one when looked at again: then two holders
        // are what is there. A few rounds at most: a name changing hands that fast is said as
        // last seen.
        let differ = matches!((&lock_file_holder, &bus_owner),
            (Some(lock), Some(bus)) if !lock.is_unknown() && !same_process(lock, bus));
        round += 1;
        if differ && round < MAX_STATUS_ROUNDS {
            let again = lock_file_holder_now(&plan, lock_plan.as_ref()).await?;
            if again.as_ref().map(|h| h.pid) != lock_file_holder.as_ref().map(|h| h.pid) {
                continue;
            }
        }
        break (lock_file_holder, bus_owner, bus_asked);
    };
    let holder = match (&lock_file_holder, &bus_owner) {
        (Some(lock), Some(bus)) if same_process(lock, bus) => {
            Some(merge(lock.clone(), bus.clone()))
        }
        (_, Some(bus)) => Some(bus.clone()),
        (lock, None) => lock.clone(),
    };
    Ok(Status {
        name: plan.name,
        holder,
        lock_file: plan.lock_file,
        bus: bus_asked,
        lock_file_holder,
        bus_owner,
    })
}

/// Whether the lock file's record and the bus's answer name one process: the same unique name
/// on the same bus (the record has it once its holder owns the name), and the same PID when
/// both tell one; else the same PID. Nothing in common is not taken for the same process:
/// merging them would name one process as the holder of what another holds. A unique name
/// alone is not enough: a bus restarted at the same address gives out the same names again,
/// and a record written before the restart may still give one (the bus's PID is only known
/// while the process that connected lives: `run`'s keeper, which names itself in the record,
/// holds the connection of a wrapper gone by then, which the bus does not name).
/// How many times [`status`] asks the lock file and the bus again when the two name different
/// processes and the lock file's changed hands meanwhile.
const MAX_STATUS_ROUNDS: u32 = 4;

/// Who holds the lock file of `plan` now (see [`status`]); `None` when it is not held or none is
/// planned.
async fn lock_file_holder_now(
    plan: &crate::Plan,
    lock_plan: Option<&crate::plan::LockPlan>,
) -> Result<Option<Holder>> {
    let (Some(path), Some(lock_plan)) = (&plan.lock_file, lock_plan) else {
        return Ok(None);
    };
    // A way `run` would refuse is refused here too, unless a copy holds the file anyway (one
    // in a directory of its owner's, looked at by another user): that is who runs.
    let way = lockfile::refuse_unsafe_way(lock_plan);
    let mut holder = match (lockfile::holder_of_async(path, &plan.name).await, way) {
        (Ok(Some(holder)), _) => Some(holder),
        (_, Err(e)) => return Err(e),
        (found, Ok(())) => found?,
    };
    if holder.is_none() {
        lockfile::refuse_unheld_file(lock_plan)?;
        // As an acquisition would meet it: a copy in the other system directory.
        holder = lockfile::copy_in_the_other_dir_async(lock_plan).await;
    }
    Ok(holder)
}

/// Who owns the bus name of `plan` now, and which bus said so (see [`status`]).
async fn bus_owner_now(plan: &crate::Plan) -> Result<(Option<Holder>, Option<BusKind>)> {
    let Some(kind) = plan.bus else {
        return Ok((None, None));
    };
    // What the bus says of the name, or why it says nothing: unreachable, or not saying who
    // owns the name (a policy that denies it, a bus that stopped answering).
    let asked = match dbus::connect(kind, Vec::new(), None).await {
        Ok(dbus::Connected { conn, .. }) => dbus::owner_of_or_unknown(&conn, &plan.name, kind)
            .await
            .map_err(|e| ("did not say who owns the name", e)),
        Err(e) => Err(("cannot be reached", e)),
    };
    match asked {
        Ok(owner) => Ok((owner.bus_unique_name.is_some().then_some(owner), Some(kind))),
        // Nothing else to look at: "not running" would be a guess (a review: a monitor acting
        // on it would start a second copy beside the name's owner).
        Err((why, e)) if plan.lock_file.is_none() => Err(Error::NoUsableBackend {
            name: plan.name.clone(),
            reason: format!("nothing could be checked: the {kind} bus {why}"),
            source: Some(Box::new(e)),
        }),
        Err((why, e)) => {
            tracing::warn!(bus = %kind, error = %e, "the bus {why}; reporting the lock file only");
            Ok((None, None))
        }
    }
}

fn same_process(lock: &Holder, bus: &Holder) -> bool {
    let same_pid = match (lock.pid, bus.pid) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    if let (Some(recorded), Some(owner)) = (&lock.bus_unique_name, &bus.bus_unique_name)
        && lock.bus == bus.bus
    {
        return recorded == owner && same_pid != Some(false);
    }
    same_pid == Some(true)
}

/// The lock file's record and the bus's answer about one connection, combined. The process is
/// the record's when it names one: the record is rewritten by whoever holds the lock (`run`'s
/// keeper names itself there once the wrapper is gone, holding the wrapper's connection too),
/// and its PID comes with a start time checked against `/proc`; the bus only knows who made the
/// connection, which may be dead, or its PID reused. The bus wins for the rest.
fn merge(lock: Holder, from_bus: Holder) -> Holder {
    let (pid, since, executable) = match (lock.pid, from_bus.pid) {
        (Some(recorded), Some(connected)) if recorded == connected => (
            Some(connected),
            from_bus.since.or(lock.since),
            from_bus.executable.or(lock.executable),
        ),
        (Some(recorded), _) => (Some(recorded), lock.since, lock.executable),
        (None, _) => (from_bus.pid, from_bus.since, from_bus.executable),
    };
    Holder {
        pid,
        uid: from_bus.uid.or(lock.uid),
        since,
        found_by: from_bus.found_by,
        bus: from_bus.bus,
        bus_unique_name: from_bus.bus_unique_name,
        executable,
        hostname: lock.hostname,
        lock_file: lock.lock_file,
        // The bus says it owns the name: a mark of waiting for it is from just before.
        queued_on_bus: None,
        queue_place: None,
    }
}
