//! A lock file removed under its holder while other copies wait for it (`--wait`). The holder
//! re-creates it (src/lockfile/recover.rs); a waiter, woken by the same removal, has the removed
//! file open and must not make a new file at the path and run while that file is still held,
//! or the two run at once (the holder's re-creation then fails, and it has lost). Reached
//! exactly through test hooks (the `test-hooks` cargo feature, which ./scripts/test turns on:
//! the copy stops itself with `SIGSTOP` there), and again in a loop of removals. (`--critical` makes two holders at once fail the one that
//! enters second, with exit 99.)

mod common;

use std::time::Duration;

use common::{
    Proc, TIMEOUT, assert_refused_naming, clean_command, cli_command, example_path, holder,
    unique_name,
};

/// Stops a waiting copy just before it waits for an event (`wait_for_release`).
const STOP_IN_LOCK_WAIT: &str = "UNIQUE_INSTANCE_TEST_STOP_IN_LOCK_WAIT";
/// Stops a waiting copy when it finds the path without a held file while the file it waited on,
/// removed, is still held: it goes on waiting (`may_be_free`).
const STOP_WAITING_ON_A_REMOVED_FILE: &str = "UNIQUE_INSTANCE_TEST_STOP_WAITING_ON_A_REMOVED_FILE";

/// The holder is stopped (it cannot re-create anything), its lock file removed, and a waiter
/// that had found it held is let go: it must go on waiting — the removed file is still held —
/// rather than make a new file and run. Once the holder runs again it re-creates its file and
/// still holds the instance; when it leaves, the waiter takes over. Through the async and the
/// blocking API, and `run --wait`.
#[test]
fn a_waiter_never_runs_while_the_removed_file_is_still_held() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let marks = tempfile::tempdir().expect("tempdir");
    for how in ["async", "blocking", "cli"] {
        let name = unique_name("removed_under_waiter");
        let path = lock_dir.path().join(format!("{name}.lock"));
        let critical = marks.path().join(&name);
        let critical = critical.to_str().expect("utf-8");
        let mut first = holder(
            None,
            lock_dir.path(),
            &[&name, "--backend", "lockfile", "--critical", critical],
        );
        let line = first.next_line("the holder");
        assert!(line.starts_with("acquired"), "{how}: {line}");

        let mut cmd = if how == "cli" {
            // COMMAND says when it runs, then holds until its stdin closes.
            let script = format!("echo running; cat; rm {critical}");
            let mut cmd = cli_command(
                None,
                lock_dir.path(),
                &["run", "--backend", "lockfile", "--wait", &name, "--"],
            );
            // Exclusive creation, as `--critical` does: a second holder fails.
            cmd.args([
                "sh",
                "-c",
                &format!("set -C; : > {critical} || exit 99; {script}"),
            ]);
            cmd
        } else {
            let mut cmd = clean_command(&example_path("holder"), None, lock_dir.path());
            cmd.args([
                &name,
                "--backend",
                "lockfile",
                "--wait",
                "forever",
                "--critical",
                critical,
            ]);
            if how == "blocking" {
                cmd.arg("--blocking");
            }
            cmd
        };
        common::arm_test_hook(&mut cmd, STOP_IN_LOCK_WAIT);
        common::arm_test_hook(&mut cmd, STOP_WAITING_ON_A_REMOVED_FILE);
        let mut waiter = Proc::spawn(cmd);
        // It found the file held, and is about to wait for it.
        waiter.stopped_at(STOP_IN_LOCK_WAIT);

        first.stop();
        std::fs::remove_file(&path).expect("remove the lock file");
        waiter.signal(rustix::process::Signal::CONT);
        // It looks (the removal woke it, or its periodic re-check), finds no file at the path,
        // and the removed one still held: it goes on waiting. Before the fix it made a new file
        // and ran here, beside the holder.
        waiter.stopped_at(STOP_WAITING_ON_A_REMOVED_FILE);

        first.signal(rustix::process::Signal::CONT);
        first.stderr_line_containing("re-created");
        waiter.signal(rustix::process::Signal::CONT);
        assert_refused_naming(lock_dir.path(), &name, first.pid(), how);
        assert_eq!(
            waiter.try_line(Duration::ZERO),
            None,
            "{how}: the waiter went ahead while the holder held"
        );

        first.close_stdin();
        assert_eq!(first.line_starting("released"), "released", "{how}");
        assert_eq!(first.exit_code(), 0, "{how}");
        let line = waiter.next_line("the waiter, after the holder left");
        if how == "cli" {
            assert_eq!(line, "running", "{how}");
        } else {
            assert!(line.starts_with("acquired"), "{how}: {line}");
            assert_refused_naming(lock_dir.path(), &name, waiter.pid(), how);
        }
        waiter.close_stdin();
        assert_eq!(waiter.exit_code(), 0, "{how}: {:?}", waiter.seen);
    }
}

/// How many times the file is removed under its holder, and how many copies wait meanwhile.
/// Before the fix a waiter won about 5 races in 12: ten removals with three waiters lose
/// one almost surely.
const REMOVALS: usize = 10;
const WAITERS: usize = 3;

/// A holder whose lock file is removed again and again while copies wait: it re-creates it
/// every time and keeps the instance (no loss, and refused copies name it); no waiter runs
/// beside it; once it leaves, the waiters take over one at a time.
#[test]
fn waiters_woken_by_removals_leave_the_holder_its_instance() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let marks = tempfile::tempdir().expect("tempdir");
    let name = unique_name("removals_and_waiters");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let critical = marks.path().join(&name);
    let critical = critical.to_str().expect("utf-8");
    let mut first = holder(
        None,
        lock_dir.path(),
        &[&name, "--backend", "lockfile", "--critical", critical],
    );
    let line = first.next_line("the holder");
    assert!(line.starts_with("acquired"), "{line}");
    let mut waiters: Vec<Proc> = (0..WAITERS)
        .map(|_| {
            let mut cmd = clean_command(&example_path("holder"), None, lock_dir.path());
            cmd.args([
                &name,
                "--backend",
                "lockfile",
                "--wait",
                "forever",
                "--critical",
                critical,
                "--hold-ms",
                "20",
            ]);
            common::arm_test_hook(&mut cmd, STOP_IN_LOCK_WAIT);
            let mut waiter = Proc::spawn(cmd);
            // Each one waiting, with the file open, before the removals start.
            waiter.stopped_at(STOP_IN_LOCK_WAIT);
            waiter.signal(rustix::process::Signal::CONT);
            waiter
        })
        .collect();

    // What the holder said on its stderr, for a failure's message.
    let mut said = Vec::new();
    for removal in 0..REMOVALS {
        std::fs::remove_file(&path).expect("remove the lock file");
        // Re-created, or lost (a waiter made the file first, and runs beside the holder).
        let deadline = std::time::Instant::now() + TIMEOUT;
        'recreated: loop {
            assert!(
                std::time::Instant::now() < deadline,
                "removal {removal}: not re-created within {TIMEOUT:?}"
            );
            for line in first.stderr_lines() {
                let recreated = line.contains("re-created");
                said.push(line);
                if recreated {
                    break 'recreated;
                }
            }
            if let Some(line) = first.try_line(Duration::from_millis(10)) {
                // Each waiter's first line, if it has one coming (a waiter that ran says so).
                let winners: Vec<_> = waiters
                    .iter_mut()
                    .filter_map(|w| w.try_line(Duration::from_millis(500)))
                    .collect();
                said.extend(first.stderr_lines());
                panic!(
                    "removal {removal}: the holder lost ({line}); the waiters said {winners:?}; \
                     the holder's stderr: {said:?}"
                );
            }
        }
    }
    assert_refused_naming(lock_dir.path(), &name, first.pid(), "after the removals");
    for (i, waiter) in waiters.iter_mut().enumerate() {
        assert_eq!(
            waiter.try_line(Duration::ZERO),
            None,
            "waiter {i} went ahead while the holder held"
        );
    }
    first.close_stdin();
    assert_eq!(first.stdout_until_closed(), ["released"], "no loss");
    assert_eq!(first.exit_code(), 0);
    // One at a time (`--critical`), each for 20 ms.
    for (i, waiter) in waiters.iter_mut().enumerate() {
        let line = waiter.next_line("a waiter, once the holder left");
        assert!(line.starts_with("acquired"), "waiter {i}: {line}");
        assert_eq!(waiter.exit_code(), 0, "waiter {i}: {:?}", waiter.seen);
    }
}
