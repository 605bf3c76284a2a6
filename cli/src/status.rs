//! `unique-instance status`: who holds NAME, without taking anything.

use serde_json::json;
use unique_instance::{Holder, Scope};

use crate::cli::StatusArgs;
use crate::{EXIT_INTERNAL, ExitCode, fail};

/// `status`'s exit code when nothing holds the instance (as `systemctl status` uses 3).
const EXIT_NOT_RUNNING: u8 = 3;

pub(crate) fn status(args: StatusArgs) -> ExitCode {
    let options = args.instance.options();
    let plan = match options.plan() {
        Ok(plan) => plan,
        Err(e) => return fail(e.exit_code(), format_args!("{e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_INTERNAL, format_args!("cannot start a runtime: {e}")),
    };
    let status = match runtime.block_on(unique_instance::status(&options)) {
        Ok(status) => status,
        Err(e) => return fail(e.exit_code(), format_args!("{e}")),
    };
    let scope = match plan.scope {
        Scope::System => "system",
        _ => "user",
    };
    if args.json {
        let holder = status.holder.as_ref();
        let object = json!({
            "name": status.name,
            "running": status.is_running(),
            "pid": holder.and_then(|h| h.pid),
            "uid": holder.and_then(|h| h.uid),
            "since": holder.and_then(Holder::since_rfc3339),
            "scope": scope,
            "found_by": holder.and_then(|h| h.found_by).map(|b| b.to_string()),
            "bus": holder.and_then(|h| h.bus).map(|b| b.to_string()),
            "bus_unique_name": holder.and_then(|h| h.bus_unique_name.clone()),
            "executable": holder.and_then(|h| h.executable.as_ref()).map(|p| p.display().to_string()),
            "hostname": holder.and_then(|h| h.hostname.clone()),
            "lock_file": holder
                .and_then(|h| h.lock_file.as_ref())
                .or(status.lock_file.as_ref())
                .map(|p| p.display().to_string()),
            // The lock file's holder only waits in this bus's queue for the name (see
            // `Holder::queued_on_bus`): the top level describes it when the bus was not asked.
            "queued_on_bus": holder.and_then(|h| h.queued_on_bus).map(|b| b.to_string()),
            // Each backend's holder on its own: two different processes when the fields above
            // describe the bus name's owner but someone else holds the lock file.
            "lock_file_holder": status.lock_file_holder.as_ref().map(holder_json),
            "bus_owner": status.bus_owner.as_ref().map(holder_json),
            "holders_differ": status.holders_differ(),
        });
        say!(stdout, "{object}");
    } else {
        let mut checked = Vec::new();
        if let Some(path) = &status.lock_file {
            checked.push(format!("lock file {}", path.display()));
        }
        if let Some(bus) = status.bus {
            checked.push(format!("the {bus} bus"));
        }
        let checked = if checked.is_empty() {
            "nothing could be checked".to_owned()
        } else {
            format!("checked {}", checked.join(" and "))
        };
        match &status.holder {
            Some(holder) => say!(
                stdout,
                "{} is running ({holder}; {scope} scope)",
                status.name
            ),
            None => say!(
                stdout,
                "{} is not running ({checked}; {scope} scope)",
                status.name
            ),
        }
        // The line above names the bus name's owner; the lock file's holder is another process
        // (or one its record does not name), and is reported on its own.
        if let (Some(lock), Some(_)) = (&status.lock_file_holder, &status.bus_owner)
            && (status.holders_differ() || lock.is_unknown())
        {
            let path = lock
                .lock_file
                .as_ref()
                .or(status.lock_file.as_ref())
                .map_or_else(
                    || "the lock file".to_owned(),
                    |p| format!("lock file {}", p.display()),
                );
            let who = if status.holders_differ() {
                "a different process"
            } else {
                "a process its record does not name"
            };
            let mut lock = lock.clone();
            // Already said at the start of the line.
            lock.lock_file = None;
            say!(stdout, "{}: {path} is held by {who} ({lock})", status.name);
        }
    }
    if status.is_running() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_RUNNING)
    }
}

/// One backend's holder, in `--json`: the same fields as the top level's.
fn holder_json(holder: &Holder) -> serde_json::Value {
    json!({
        "pid": holder.pid,
        "uid": holder.uid,
        "since": holder.since_rfc3339(),
        "bus": holder.bus.map(|b| b.to_string()),
        "bus_unique_name": holder.bus_unique_name,
        "executable": holder.executable.as_ref().map(|p| p.display().to_string()),
        "hostname": holder.hostname,
        "lock_file": holder.lock_file.as_ref().map(|p| p.display().to_string()),
        "queued_on_bus": holder.queued_on_bus.map(|b| b.to_string()),
    })
}
