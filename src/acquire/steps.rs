//! The acquisition as a walk over the plan's steps ([`Step`]), one backend each, in order:
//! each step adds its part to what is held ([`Holding`]), and the [`Context`] carries what one
//! backend's step needs from another's. Then the watches start and the guard is built.
//! Must not: speak a backend's protocol (the steps call their modules), nor plan.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::dbus::{Connected, Export};
use crate::error::Result;
use crate::guard::{GuardParts, InstanceGuard};
use crate::held::{Held, Holding};
use crate::loss::LossLog;
use crate::name::InstanceName;
use crate::options::{InstanceOptions, Wait, options_wait};
use crate::plan::Step;
use crate::scope::{BackendSelection, BusKind, Scope};

use super::{bus, lock_file};

/// What the steps of one acquisition share: the options, what is held so far, and the
/// couplings between backends.
pub(super) struct Context {
    pub(super) name: InstanceName,
    pub(super) wait: Wait,
    /// When a bounded wait ends.
    pub(super) deadline: Option<Instant>,
    /// The wait asked for, for messages.
    pub(super) timeout: Duration,
    pub(super) allow_replacement: bool,
    pub(super) allow_network_filesystem: bool,
    pub(super) notify_ready: bool,
    pub(super) watch_lock: bool,
    /// The objects to serve on the bus connection, taken by the step that connects.
    pub(super) exports: Vec<Export>,
    /// What is held so far, in order.
    pub(super) held: Holding,
    /// The loss log the watchers feed.
    pub(super) losses: LossLog,
    /// The watchers started so far, aborted with the guard.
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// The bus a later step owns the name on, when a connection may be made ahead of it: a
    /// wait for the lock file connects meanwhile, so that a take-over is one round trip from
    /// the bus name. Not with objects to serve: they can go to one connection only, and a
    /// connection made early may have to be replaced if the bus restarts meanwhile.
    pub(super) bus_ahead: Option<BusKind>,
    /// The bus a later step owns the name on, if any: a copy refused by a lock file whose
    /// holder only waits in that bus's queue asks it who runs (see `lock_file::naming_who_runs`).
    pub(super) planned_bus: Option<BusKind>,
    /// A connection made ahead (see `bus_ahead`), for the bus step.
    pub(super) early_bus: Option<Connected>,
    /// The process that held the lock file before us, by its record: the bus step gives the
    /// bus a moment to drop a name that process still owns.
    pub(super) previous_pid: Option<u32>,
}

impl Context {
    /// Whether a local backend (the lock file) is held already: then a bus that cannot be
    /// reached, or that goes away before granting the name, leaves it to enforce exclusion
    /// alone, instead of failing the acquisition.
    pub(super) fn held_locally(&self) -> bool {
        self.held.lock_file().is_some()
    }
}

/// Acquires every step of `steps` in order, then starts the watches and builds the guard.
/// Dropped halfway (an error, a cancelled future), what is held so far is released, the last
/// acquired first (see [`Holding`]).
pub(super) async fn walk(
    mut options: InstanceOptions,
    name: InstanceName,
    scope: Scope,
    steps: Vec<Step>,
) -> Result<InstanceGuard> {
    let deadline = match options.wait {
        // Too far to be an instant: no deadline, as long a wait as one could tell apart.
        Wait::Timeout(d) => Instant::now().checked_add(d),
        _ => None,
    };
    let bus_ahead = steps.iter().find_map(|step| match step {
        Step::Bus(bus) if options.exports.is_empty() => Some(bus.kind),
        _ => None,
    });
    let planned_bus = steps.iter().find_map(|step| match step {
        Step::Bus(bus) => Some(bus.kind),
        _ => None,
    });
    let (loss_tx, loss_rx) = LossLog::new();
    let mut ctx = Context {
        name,
        wait: options.wait,
        deadline,
        timeout: options_wait(&options),
        allow_replacement: options.allow_replacement,
        allow_network_filesystem: options.allow_network_filesystem,
        notify_ready: options.notify_ready,
        watch_lock: options.watch_lock,
        exports: std::mem::take(&mut options.exports),
        held: Holding::default(),
        losses: loss_tx,
        tasks: Vec::new(),
        bus_ahead,
        planned_bus,
        early_bus: None,
        previous_pid: None,
    };
    for step in steps {
        match step {
            Step::LockFile(plan) => lock_file::acquire(&mut ctx, &plan).await?,
            Step::Bus(plan) => bus::acquire(&mut ctx, plan).await?,
        }
    }
    if planned_bus.is_none() && ctx.held_locally() && options.backends == BackendSelection::Auto {
        tracing::warn!(
            name = %ctx.name,
            "no D-Bus bus is configured; the lock file alone enforces exclusion"
        );
    }

    // The watches that start once everything is held (the bus's started with its name).
    for part in ctx.held.iter_mut() {
        if let Held::LockFile(file) = part {
            file.start_watch(options.recheck, &ctx.losses)?;
        }
    }

    let Context {
        name,
        held,
        losses,
        tasks,
        ..
    } = ctx;
    tracing::info!(
        name = %name,
        lock_file = ?held.lock_file().map(|file| file.lock().path()),
        bus = ?held.name().map(crate::dbus::HeldName::kind),
        "acquired instance"
    );
    Ok(InstanceGuard::new(GuardParts {
        name,
        scope,
        held,
        loss_log: losses,
        losses: loss_rx,
        tasks,
    }))
}
