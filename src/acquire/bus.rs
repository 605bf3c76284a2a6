//! The bus step of an acquisition: connect (or take the connection a wait made), own the name
//! with explicit flags, complete the lock file's record once it is owned, and watch it; when a
//! local backend is held, a bus that cannot be reached leaves that backend to enforce exclusion
//! alone.
//! Must not: speak the bus's protocol (that is `dbus`).

use crate::dbus::{self, HeldName, own_name, request_flags, watch_bus};
use crate::error::{Error, Result};
use crate::held::Held;
use crate::holder::BusQueuePlace;
use crate::lockfile::HeldFile;
use crate::plan::BusPlan;
use crate::scope::Backend;
use crate::test_hooks::Hook;

use super::steps::Context;

/// Owns the name on the bus of `plan`.
pub(super) async fn acquire(ctx: &mut Context, plan: BusPlan) -> Result<()> {
    let name = ctx.name.clone();
    let flags = request_flags(ctx.wait, ctx.allow_replacement);
    let connected = match ctx.early_bus.take() {
        // A connection made while waiting, unless the bus dropped it meanwhile.
        Some(connected) if !connected.conn.is_closed() => Ok(connected),
        _ => {
            let exports = std::mem::take(&mut ctx.exports);
            // Sent with the handshake, unless a test is to stop us before it is sent.
            let request = (!Hook::BeforeRequestName.armed()).then_some((name.as_str(), flags));
            dbus::connect(plan.kind, exports, request).await
        }
    };
    let held_locally = ctx.held_locally();
    let connected = match connected {
        Ok(connected) => connected,
        // Only what we asked it to serve can fail this way (an invalid object path, an
        // interface given twice): a mistake to report, not an unreachable bus.
        Err(e @ (zbus::Error::InterfaceExists(..) | zbus::Error::InvalidObjectPath)) => {
            return Err(Error::Bus {
                context: "cannot export an object",
                bus: plan.kind,
                source: e,
            });
        }
        Err(e) if !held_locally => {
            return Err(Error::NoUsableBackend {
                name: name.to_string(),
                reason: format!("cannot reach the {} bus ({})", plan.kind, plan.why),
                source: Some(Box::new(e)),
            });
        }
        Err(e) => {
            tracing::warn!(
                name = %name,
                bus = %plan.kind,
                error = %e,
                "the {} bus is unreachable; the lock file alone enforces exclusion",
                plan.kind
            );
            return Ok(());
        }
    };

    // Dropped with this future if it is cancelled, or on an error below: the bus then drops
    // the name or our place in its queue at once, whatever runs the runtime.
    let dbus::Connected {
        conn,
        stream,
        pending_request,
        disconnect,
    } = connected;
    // Our place in the queue, should the bus put us there, goes into the lock file's record.
    let place = conn.unique_name().map(|unique_name| BusQueuePlace {
        bus: plan.kind,
        unique_name: unique_name.to_string(),
        server_guid: conn.server_guid().to_string(),
    });
    let file = ctx.held.lock_file_mut();
    let on_queued = move || {
        if let Some((file, place)) = file.zip(place) {
            note_queue_place(file, Some(place));
        }
    };
    let owned = own_name(
        &name,
        plan.kind,
        &conn,
        stream,
        pending_request,
        ctx.wait,
        ctx.deadline,
        ctx.allow_replacement,
        ctx.previous_pid,
        held_locally,
        on_queued,
    )
    .await?;
    match owned {
        Some(stream) => {
            // Only now: a copy queued for the name (waiting) does not own it, and its record
            // must not say it does, or refused copies and `status` would name it as the bus
            // name's owner. Written before anything else, so that copies refused from now on
            // can name us on the bus.
            if let Some(file) = ctx.held.lock_file_mut() {
                let unique_name = conn.unique_name().map(|n| n.to_string());
                file.record_also(Backend::Dbus, Some(plan.kind), unique_name)?;
            }
            let lock_still_held = ctx.held.lock_file().map(HeldFile::still_held_check);
            let forget_bus = ctx.held.lock_file().map(HeldFile::bus_gone_recorder);
            ctx.tasks.push(tokio::spawn(watch_bus(
                stream,
                name.to_string(),
                ctx.losses.clone(),
                lock_still_held,
                forget_bus,
            )));
            ctx.held.push(Held::Name(HeldName::new(
                plan.kind,
                conn,
                disconnect,
                ctx.allow_replacement,
            )));
        }
        // The bus went away before granting the name: the lock file alone holds the instance,
        // as when no bus was reachable, and the record, written before the bus step, says so.
        // (Ending the connection here leaves nothing of ours on a bus that comes back.)
        None if held_locally => {
            drop((conn, disconnect));
            // No longer in a queue: the lock file alone holds the instance, and we run.
            if let Some(file) = ctx.held.lock_file_mut() {
                note_queue_place(file, None);
            }
        }
        // Without the lock file `own_name` reports the bus's loss as an error.
        None => {
            return Err(Error::NoUsableBackend {
                name: name.to_string(),
                reason: format!("the {} bus went away before it granted the name", plan.kind),
                source: None,
            });
        }
    }
    Ok(())
}

/// Records our place in the bus's queue, or that we have none any more (see
/// [`HeldFile::record_queued`]). Only what refused copies are told depends on it: a write that
/// fails is logged, and the acquisition goes on (the lock file excludes all the same).
fn note_queue_place(file: &mut HeldFile, place: Option<BusQueuePlace>) {
    if let Err(e) = file.record_queued(place) {
        tracing::warn!(error = %e, "cannot record our place in the bus's queue in the lock file");
    }
}
