//! Acquisitions that end, are cancelled or are released leave nothing behind: no thread, no
//! descriptor, no bus name or queue entry, no lock; the blocking API works inside runtimes.

mod common;

use std::path::Path;

use common::{
    BusConfig, DbusDaemon, Proc, clean_command, example_path, field, holder, unique_name,
};

/// The `lifecycle` example running `scenario` for `name`, with `args`.
fn lifecycle(
    bus: Option<&str>,
    lock_dir: &Path,
    scenario: &str,
    name: &str,
    args: &[&str],
) -> Proc {
    let mut cmd = clean_command(&example_path("lifecycle"), bus, lock_dir);
    cmd.arg(scenario).arg(name).args(args);
    Proc::spawn(cmd)
}

fn number(line: &str, key: &str) -> usize {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A wait that times out takes its thread and descriptors with it, and leaves nothing that
/// could take the lock later: once the holder leaves, a fresh copy acquires at once, while the
/// process that gave up is still alive.
#[test]
fn a_timed_out_wait_leaves_nothing_behind() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for (backend, mode) in [
        ("lockfile", "--blocking"),
        ("auto", "--blocking"),
        ("lockfile", "--async"),
        ("auto", "--async"),
    ] {
        let what = format!("{backend} {mode}");
        let name = unique_name("timed_out_wait");
        let mut h = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        assert!(h.next_line("holder").starts_with("acquired"), "{what}");
        let mut args = vec!["--backend", backend, "--wait-ms", "200"];
        if mode == "--async" {
            args.push("--async");
        }
        let mut w = lifecycle(
            Some(&bus.address),
            lock_dir.path(),
            "timed-out-wait",
            &name,
            &args,
        );
        let counts = w.line_starting("counts");
        assert_eq!(
            number(&counts, "threads_after"),
            number(&counts, "threads_before"),
            "{what}: a thread outlived the wait: {counts}"
        );
        if mode == "--blocking" {
            // The blocking API's runtime is gone with the wait: so must every descriptor be.
            assert_eq!(
                number(&counts, "fds_after"),
                number(&counts, "fds_before"),
                "{what}: a descriptor outlived the wait: {counts}"
            );
        }
        assert_eq!(w.next_line("parked"), "parked", "{what}");
        h.close_stdin();
        assert_eq!(h.line_starting("released"), "released", "{what}");
        // The copy that gave up is still alive: nothing of it may take the lock now.
        let mut fresh = holder(
            Some(&bus.address),
            lock_dir.path(),
            &[&name, "--backend", backend],
        );
        let line = fresh.next_line("fresh copy");
        assert!(line.starts_with("acquired"), "{what}: {line}");
        fresh.close_stdin();
        assert_eq!(fresh.exit_code(), 0, "{what}");
        w.close_stdin();
        assert_eq!(w.exit_code(), 0, "{what}");
    }
}
