//! The command line: any argument vector (any bytes, not only UTF-8) is parsed by the binary's
//! own clap definition without a panic, and every value it accepts is one the run can use: the
//! durations fit on a deadline, and the options plan without a panic.
//!
//! Input: the arguments after the program name, separated by NUL bytes. An input whose first
//! byte is 1 to 7 is instead one value, put into a command line that is valid around it (see
//! [`TEMPLATES`]): byte-level mutations of whole command lines rarely keep them valid while they
//! turn a number into an edge case such as `1e19`.
#![no_main]

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches};
use libfuzzer_sys::fuzz_target;

// The binary's own parser, not a copy of it; deploy/ comes along for `generate`'s values. A
// new `use` in either file may need its crate added to fuzz/Cargo.toml.
#[allow(dead_code, unreachable_pub)]
#[path = "../../cli/src/cli.rs"]
mod cli;
// (Only the checks `cli.rs` calls are used here: the rest of deploy/'s re-exports are not.)
#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../../cli/src/deploy/mod.rs"]
mod deploy;

use cli::{Cli, Command, InstanceArgs, WaitFor};

/// Where the value goes in a template: the whole argument, or its end.
const VALUE: &str = "{}";

/// Command lines with one value to fill in, chosen by the input's first byte (1 = the first).
const TEMPLATES: [&[&str]; 7] = [
    &["run", "--wait={}", "org.acme.Backup", "--", "true"],
    &["run", "--kill-after", "{}", "org.acme.Backup", "--", "true"],
    &["run", "--recheck", "{}", "org.acme.Backup", "--", "true"],
    &["run", "-E", "{}", "org.acme.Backup", "--", "true"],
    &["status", "--lock-file", "{}", "org.acme.Backup"],
    &["status", "--json", "{}"],
    &[
        "generate",
        "--exec",
        "/usr/bin/srv",
        "--user",
        "srv",
        "--callers",
        "{}",
        "org.acme.Srv",
    ],
];

thread_local! {
    static COMMAND: std::cell::RefCell<clap::Command> = std::cell::RefCell::new(Cli::command());
}

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = match data.split_first() {
        Some((&template @ 1..=7, value)) => TEMPLATES[usize::from(template - 1)]
            .iter()
            .map(|arg| match arg.strip_suffix(VALUE) {
                Some(prefix) => OsStr::from_bytes(&[prefix.as_bytes(), value].concat()).to_owned(),
                None => OsString::from(arg),
            })
            .collect(),
        _ => data
            .split(|&b| b == 0)
            .map(|arg| OsStr::from_bytes(arg).to_owned())
            .collect(),
    };
    let args = std::iter::once(OsString::from("unique-instance")).chain(args);
    // `Cli::try_parse_from` is exactly this with a newly built command each time; building it
    // (every argument and help text) took most of each execution.
    let parsed = COMMAND.with_borrow_mut(|command| {
        let mut matches = command.try_get_matches_from_mut(args)?;
        Cli::from_arg_matches_mut(&mut matches)
    });
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            // What main prints: the usage error, or --help / --version.
            let _ = e.render().to_string();
            return;
        }
    };
    match cli.command {
        Command::Run(args) => {
            if let Some(WaitFor::Up(limit)) = args.wait {
                usable("--wait", limit);
            }
            usable("--kill-after", args.kill_after);
            usable("--recheck", args.recheck);
            plan(&args.instance);
        }
        Command::Status(args) => plan(&args.instance),
        Command::Generate(_) | Command::Man { .. } | Command::Completions { .. } => {}
    }
});

/// The library and the wrapper add durations to the current time (a wait's deadline, the grace
/// before SIGKILL): a value the parser accepts must not overflow there.
fn usable(option: &str, value: Duration) {
    assert!(
        Instant::now().checked_add(value).is_some(),
        "{option} accepted {value:?}, which overflows a deadline"
    );
}

/// What `run` and `status` do first with the options: decide the lock file and the bus.
fn plan(instance: &InstanceArgs) {
    let _ = instance.options().plan();
}
