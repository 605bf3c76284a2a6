//! `unique-instance status`: who holds NAME, without taking anything.

use std::process::ExitCode;

use serde_json::json;
use unique_instance::{Scope, format_rfc3339};

use crate::cli::StatusArgs;
use crate::{EXIT_INTERNAL, fail};

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
            "since": holder.and_then(|h| h.since).map(format_rfc3339),
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
        });
        println!("{object}");
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
            Some(holder) => println!("{} is running ({holder}; {scope} scope)", status.name),
            None => println!("{} is not running ({checked}; {scope} scope)", status.name),
        }
    }
    if status.is_running() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_RUNNING)
    }
}
