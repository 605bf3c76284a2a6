//! Many copies acquiring and releasing one name in a tight loop only ever see "acquired" or
//! "already running": a file caught in the middle of its removal is a race to retry, never an
//! error.
//!
//! The count is small by default, for CI; `UNIQUE_INSTANCE_CHURN=50000` runs the long form (see
//! the README).

mod common;

use common::{Proc, clean_command, example_path, field, unique_name};

/// Processes churning at once.
const COPIES: u64 = 4;
/// Acquisitions in all, unless `UNIQUE_INSTANCE_CHURN` says otherwise.
const DEFAULT_ACQUISITIONS: u64 = 4000;

/// Acquisitions in all with every option left as it is (both backends on a private bus, the
/// lock file watched), unless `UNIQUE_INSTANCE_CHURN` says otherwise: each costs a bus round
/// trip and a watch thread.
const DEFAULT_ACQUISITIONS_WITH_DEFAULTS: u64 = 1000;

/// The lock file alone, unwatched: the tightest loop.
#[test]
fn churning_copies_only_ever_acquire_or_are_refused() {
    churn(DEFAULT_ACQUISITIONS, None);
}

/// Every option as a program leaves it: the lock file watched, and the bus name as well.
#[test]
fn churning_copies_with_default_options_only_ever_acquire_or_are_refused() {
    let bus = common::DbusDaemon::start(common::BusConfig::Open);
    churn(DEFAULT_ACQUISITIONS_WITH_DEFAULTS, Some(&bus.address));
}

/// `COPIES` processes churning `default_total` acquisitions (or `UNIQUE_INSTANCE_CHURN`), with
/// default options on `bus` when given.
fn churn(default_total: u64, bus: Option<&str>) {
    let total = match std::env::var("UNIQUE_INSTANCE_CHURN") {
        Ok(v) => v
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("UNIQUE_INSTANCE_CHURN={v:?} is not a number")),
        Err(_) => default_total,
    };
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let marks = tempfile::tempdir().expect("tempdir");
    let critical = marks.path().join("inside");
    let name = unique_name("churn");
    let per_copy = total.div_ceil(COPIES).to_string();
    let mut copies: Vec<Proc> = (0..COPIES)
        .map(|_| {
            let mut cmd = clean_command(&example_path("churn"), bus, lock_dir.path());
            cmd.arg(&name).arg(&per_copy).arg(&critical);
            if bus.is_some() {
                cmd.arg("--defaults");
            }
            Proc::spawn(cmd)
        })
        .collect();
    let (mut acquired, mut refused) = (0u64, 0u64);
    for (i, copy) in copies.iter_mut().enumerate() {
        // A progress line every 100 acquisitions: each must come within the harness's
        // timeout, so a copy stuck in a loop is caught without a bound on the whole run.
        let done = loop {
            let line = copy.next_line("churn progress");
            if line.starts_with("done") {
                break line;
            }
            assert!(line.starts_with("progress"), "copy {i}: {line}");
        };
        assert_eq!(copy.exit_code(), 0, "copy {i}: {:?}", copy.seen);
        let count = |key| {
            field(&done, key)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("copy {i}: no {key} in {done:?}"))
        };
        acquired += count("acquired");
        refused += count("refused");
    }
    assert!(acquired >= total, "{acquired} acquisitions, {total} asked");
    eprintln!(
        "{COPIES} copies ({}): {acquired} acquisitions, {refused} refusals, no error",
        if bus.is_some() {
            "default options, a bus"
        } else {
            "lock file alone, unwatched"
        }
    );
}
