//! The lock-file step of an acquisition: take the lock file (or wait for it, connecting to the
//! bus meanwhile when a bus step follows), write the record at once, and hold it.
//! Must not: speak the lock file's protocol (that is `lockfile`).

use crate::Holder;
use crate::error::{Error, Result, already_running};
use crate::held::Held;
use crate::lockfile::{self, Attempt, HeldFile, try_lock, wait_lock};
use crate::options::Wait;
use crate::plan::LockPlan;

use super::steps::Context;

/// Takes the lock file of `plan`, waiting for it if the options say so. The record is written
/// at once, so that copies refused meanwhile can name us without waiting for the other
/// backends; later steps complete it.
pub(super) async fn acquire(ctx: &mut Context, plan: &LockPlan) -> Result<()> {
    // Again when our file was lost while we waited for the other directory's copy.
    loop {
        match acquire_once(ctx, plan).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(naming_who_runs(ctx, e).await),
        }
    }
}

/// `refusal` (already running, timed out), naming the bus name's owner when the lock file's
/// holder only waits in a bus's queue for the name, by its record (behind a program that owns
/// the name without the lock file: a review found refusals naming that waiter, with its start
/// time, as the running copy). Asked only then, and only of the bus this copy would own the
/// name on, and only when it is the very bus the holder waits on (its GUID: another session's
/// bus, or the same address after a restart, gives out the same unique names to others), within
/// [`ASK_THE_BUS_WITHIN`], which a refusal or a timed-out wait then takes at most beyond its
/// deadline (a bus that answers does so in a millisecond or two). The holder is kept when the
/// bus names no owner, or names the holder itself (granted the name meanwhile: then running,
/// and said so); its mark otherwise tells the reader that it waits.
async fn naming_who_runs(ctx: &Context, refusal: Error) -> Error {
    let Some(holder) = refusal.holder() else {
        return refusal;
    };
    let Some(place) = holder.queue_place.clone() else {
        return refusal;
    };
    if ctx.planned_bus != Some(place.bus) {
        return refusal;
    }
    let ask = async {
        let connected = crate::dbus::connect(place.bus, Vec::new(), None)
            .await
            .ok()?;
        if connected.conn.server_guid().to_string() != place.server_guid {
            return None;
        }
        crate::dbus::owner_of_or_unknown(&connected.conn, ctx.name.as_str(), place.bus)
            .await
            .ok()
    };
    let Ok(Some(owner)) = tokio::time::timeout(ASK_THE_BUS_WITHIN, ask).await else {
        return refusal;
    };
    if owner.bus_unique_name.as_deref() == Some(place.unique_name.as_str()) {
        let holder = Holder {
            bus: Some(place.bus),
            bus_unique_name: Some(place.unique_name),
            queued_on_bus: None,
            queue_place: None,
            ..holder.clone()
        };
        return refusal.naming(holder);
    }
    // Named even when the bus does not say which process it is (a TCP bus, a connection whose
    // maker is gone, another PID namespace): "holder unknown" on the bus, not the waiter's PID
    // (a review: a script acting on that PID picks the wrong process).
    if owner.bus_unique_name.is_some() {
        return refusal.naming(owner);
    }
    refusal
}

/// How long a refused copy asks the bus who runs (see [`naming_who_runs`]).
const ASK_THE_BUS_WITHIN: std::time::Duration = std::time::Duration::from_millis(500);

/// One try of [`acquire`]: `false` when the lock file taken stopped being at its path while
/// this copy waited for a copy in the other system directory (it had no watch then), so that
/// another copy may have taken the path meanwhile and the acquisition starts over.
async fn acquire_once(ctx: &mut Context, plan: &LockPlan) -> Result<bool> {
    // Made before the lock and the bus socket so that a killed holder releases both before it
    // (see `HeldLock::move_above`).
    let inotify = ctx.watch_lock.then(lockfile::new_inotify);
    // A bounded wait bounds the first attempt too: its reading of a holder that has not
    // written its record yet is given a grace (up to 2 s) that must not outlast the wait asked
    // for. (Dropping the attempt leaves nothing behind: it holds no lock while it reads.)
    let first = try_lock(plan, ctx.allow_network_filesystem);
    let first = match (ctx.wait, ctx.deadline) {
        (Wait::Timeout(_), Some(deadline)) => {
            match tokio::time::timeout_at(deadline.into(), first).await {
                Ok(attempt) => attempt,
                Err(_) => return Err(lockfile::timed_out(&ctx.name, plan, ctx.timeout, None)),
            }
        }
        _ => first.await,
    };
    let (held, previous, wait_watch) = match first? {
        (Attempt::Acquired(held, previous), _) => (held, previous, None),
        (Attempt::Busy(holder), _) if ctx.wait == Wait::No => {
            return Err(already_running(&ctx.name, holder));
        }
        (Attempt::KeptOut, _) if ctx.wait == Wait::No => {
            return Err(lockfile::read_locked(plan, &plan.path()));
        }
        (attempt @ (Attempt::Busy(_) | Attempt::KeptOut), dir) => {
            let holder = match attempt {
                Attempt::Busy(holder) => holder,
                _ => Box::new(lockfile::holder_now(&plan.path())),
            };
            let waited = wait_lock(
                &ctx.name,
                plan,
                dir,
                holder,
                ctx.notify_ready,
                ctx.deadline,
                ctx.timeout,
            );
            let waited = match ctx.bus_ahead {
                // Connected meanwhile (the name is asked for only once the lock file is ours),
                // so that a take-over is one round trip from the bus name.
                Some(bus) => {
                    let mut connect = std::pin::pin!(crate::dbus::connect(bus, Vec::new(), None));
                    let mut waited = std::pin::pin!(waited);
                    let mut connected = None;
                    // The wait decides: once it ends (acquired, timed out, failed), a
                    // connection still on its way is not waited for unless the lock file is
                    // ours (a slow bus must not stretch a timeout).
                    let waited = loop {
                        tokio::select! {
                            waited = &mut waited => break waited?,
                            c = &mut connect, if connected.is_none() => {
                                connected = Some(c);
                            }
                        }
                    };
                    // The lock directory and the way to it watched at once, not after the
                    // connection still on its way (see `HeldFile::new`, which adds the same
                    // watches again).
                    if let Some(Ok(inotify)) = &inotify {
                        let _ = waited.0.watch_handle().add_watches_now(inotify);
                    }
                    ctx.early_bus = match connected {
                        Some(connected) => connected.ok(),
                        None => connect.await.ok(),
                    };
                    waited
                }
                None => waited.await?,
            };
            let (held, previous, watch) = waited;
            (held, previous, watch)
        }
    };
    // A copy in the other system directory (see `copy_in_the_other_dir`): one started before
    // the deployment made the service's own directory, or one that planned the shared
    // directory as it was being made. Ours is held meanwhile, so copies starting now queue
    // behind this one. Only the service's directory's copy waits for the other: were the
    // shared one's to wait too, each would wait for the other.
    if let Some(holder) = lockfile::copy_in_the_other_dir_async(plan).await {
        if ctx.wait == Wait::No || !plan.service_dir {
            return Err(already_running(&ctx.name, Box::new(holder)));
        }
        tracing::info!(name = %ctx.name, holder = %holder, "waiting for the copy in the other system lock directory to exit");
        if !lockfile::until_the_other_dir_is_free(plan, ctx.deadline).await {
            return Err(Error::TimedOut {
                name: ctx.name.to_string(),
                waited: ctx.timeout,
                holder: Box::new(holder),
            });
        }
        // Unwatched all that time: removed meanwhile, our file no longer excludes anyone, and
        // a copy that made a new one at the path may be waiting here too (a review saw both
        // run once the other directory's copy left).
        if held.watch_handle().check_path().is_some() {
            tracing::debug!(name = %ctx.name, "the lock file went while waiting; starting over");
            return Ok(false);
        }
    }
    ctx.previous_pid = previous.as_ref().map(|p| p.pid);
    let file = HeldFile::new(held, inotify, wait_watch)?;
    ctx.held.push(Held::LockFile(file));
    Ok(true)
}
