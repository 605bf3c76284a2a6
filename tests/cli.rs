//! The `unique-instance` command-line tool, as cron jobs and scripts use it: real processes,
//! a private `dbus-daemon`, and COMMANDs that are small shell scripts reporting what they see.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{BusConfig, DbusDaemon, Proc, TIMEOUT, as_user, cli, cli_command, unique_name};
use rustix::process::Signal;

/// A COMMAND that says it runs, then waits for its stdin (the wrapper's, untouched) to close.
const HOLD: &str = "echo running $$; read _; echo done";

/// `count` wrappers for the same name, started together: each is a shell that waits for "go"
/// on stdin and then `exec`s the wrapper (same PID), which passes the rest of stdin to COMMAND.
fn race(count: usize, bus: &DbusDaemon, extra: &[&str]) -> (Vec<Proc>, tempfile::TempDir) {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("cli_race");
    let bin = common::cli_path();
    let bin = bin.display();
    let mut script = format!("read go; exec {bin} run");
    for arg in extra {
        script.push_str(&format!(" {arg}"));
    }
    script.push_str(&format!(" {name} -- sh -c '{HOLD}'"));
    let mut copies: Vec<Proc> = (0..count)
        .map(|_| {
            let mut cmd =
                common::clean_command(Path::new("/bin/sh"), Some(&bus.address), lock_dir.path());
            cmd.args(["-c", &script]);
            Proc::spawn(cmd)
        })
        .collect();
    for copy in &mut copies {
        copy.send("go\n");
    }
    (copies, lock_dir)
}

/// Checks a race: exactly one ran COMMAND; every other exited `conflict_code` naming its PID.
fn check_race(mut copies: Vec<Proc>, conflict_code: i32) {
    let mut winner = None;
    let mut losers = Vec::new();
    for (i, copy) in copies.iter_mut().enumerate() {
        // A loser's stdout closes without a line; the winner's COMMAND prints one.
        match copy.try_line(TIMEOUT) {
            Some(line) => {
                assert!(
                    line.starts_with("running "),
                    "copy {i}: unexpected {line:?}"
                );
                assert!(
                    winner.is_none(),
                    "two copies ran COMMAND: {winner:?} and {i}"
                );
                winner = Some(i);
            }
            None => losers.push(i),
        }
    }
    let winner = winner.expect("no copy ran COMMAND");
    let winner_pid = copies[winner].pid();
    for i in losers {
        let code = copies[i].exit_code();
        let stderr = copies[i].stderr_until_closed().join("\n");
        assert_eq!(code, conflict_code, "copy {i}: stderr {stderr}");
        assert!(
            stderr.contains(&format!("is already running (pid {winner_pid},"))
                && stderr.starts_with("unique-instance: "),
            "copy {i} did not name the holder (pid {winner_pid}): {stderr}"
        );
    }
    let copy = &mut copies[winner];
    copy.close_stdin();
    copy.expect_line("done");
    assert_eq!(copy.exit_code(), 0);
}

#[test]
fn two_then_thirty_two_runs_one_command() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let (copies, _dir) = race(2, &bus, &[]);
    check_race(copies, 75);
    let (copies, _dir) = race(32, &bus, &[]);
    check_race(copies, 75);
}

#[test]
fn conflict_exit_code_is_configurable() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let (copies, _dir) = race(4, &bus, &["-E", "9"]);
    check_race(copies, 9);
}

#[test]
fn quiet_conflict_says_nothing() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("quiet");
    let mut holder = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD],
    );
    holder.line_starting("running");
    let mut second = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", "-q", &name, "--", "true"],
    );
    assert_eq!(second.exit_code(), 75);
    assert_eq!(second.stderr_until_closed(), Vec::<String>::new());
}

#[test]
fn exit_status_passes_through() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status_through");
    let run = |script: &str| {
        cli(
            None,
            lock_dir.path(),
            &["run", &name, "--", "sh", "-c", script],
        )
        .exit_code()
    };
    assert_eq!(run("exit 7"), 7);
    assert_eq!(run("exit 0"), 0);
    assert_eq!(run("kill -TERM $$"), 143, "death by SIGTERM is 128+15");
    assert_eq!(run("kill -KILL $$"), 137, "death by SIGKILL is 128+9");
    let mut missing = cli(
        None,
        lock_dir.path(),
        &["run", &name, "--", "/nonexistent/command"],
    );
    assert_eq!(missing.exit_code(), 127);
    let stderr = missing.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("cannot run /nonexistent/command"),
        "{stderr}"
    );
}

#[test]
fn signals_to_the_wrapper_reach_command() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("signals");
    // COMMAND records every signal it gets; `wait` is interrupted by a trapped signal at once.
    let script = "for s in HUP INT QUIT USR1 USR2; do trap \"echo got-$s\" $s; done; \
                  trap 'echo got-TERM; kill $pid; exit 0' TERM; \
                  sleep 60 & pid=$!; echo ready; \
                  while :; do wait $pid; done";
    let mut wrapper = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", script],
    );
    wrapper.expect_line("ready");
    for (signal, word) in [
        (Signal::HUP, "HUP"),
        (Signal::INT, "INT"),
        (Signal::QUIT, "QUIT"),
        (Signal::USR1, "USR1"),
        (Signal::USR2, "USR2"),
    ] {
        wrapper.signal(signal);
        wrapper.expect_line(&format!("got-{word}"));
    }
    wrapper.signal(Signal::TERM);
    wrapper.expect_line("got-TERM");
    assert_eq!(
        wrapper.exit_code(),
        0,
        "COMMAND's own status, 0 after its trap"
    );
}

/// In a container whose session's leader is outside its PID namespace (as a CI job's often is),
/// the session ID reads as 0. A hang-up to the wrapper there once killed its signal thread (a
/// debug assertion in rustix's `getsid` on 0), and with it the wrapper: COMMAND got SIGTERM from
/// the keeper, never the SIGHUP. Here the wrapper runs in a PID namespace of its own, below a
/// shell that is its namespace's init, so neither it nor anything in its namespace leads its
/// session.
#[test]
fn a_hang_up_reaches_command_when_the_session_leader_is_outside_our_pid_namespace() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes a PID namespace)"
    );
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("pidns_hup");
    let script = "trap 'echo got-HUP' HUP; \
                  trap 'echo got-TERM; kill $pid; exit 0' TERM; \
                  sleep 60 & pid=$!; echo ready; \
                  while :; do wait $pid; done";
    let inner = cli_command(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", script],
    );
    let mut unshare = std::process::Command::new(common::require_program("unshare", "util-linux"));
    // The shell stays as the namespace's init, so the wrapper is an ordinary process there.
    unshare
        .args(["--pid", "--fork", "--mount-proc", "--", "sh", "-c"])
        .arg("\"$0\" \"$@\"; exit $?");
    let mut outer = Proc::spawn(common::wrapped(unshare, &inner));
    outer.expect_line("ready");
    // The wrapper's PID as seen from here: the child of the namespace's init, itself the only
    // child of `unshare`.
    let only_child = |pid: u32| -> u32 {
        let list =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).expect("children");
        let children: Vec<u32> = list
            .split_whitespace()
            .map(|p| p.parse().expect("a pid"))
            .collect();
        assert_eq!(children.len(), 1, "{pid} has one child: {children:?}");
        children[0]
    };
    let wrapper = only_child(only_child(outer.pid()));
    let wrapper = rustix::process::Pid::from_raw(wrapper as i32).expect("pid");
    let session = std::fs::read_to_string(format!("/proc/{}/stat", wrapper.as_raw_nonzero()))
        .expect("the wrapper's stat");
    assert!(
        session.contains("unique-instance"),
        "found the wrapper: {session}"
    );
    rustix::process::kill_process(wrapper, Signal::HUP).expect("hang-up");
    outer.expect_line("got-HUP");
    rustix::process::kill_process(wrapper, Signal::TERM).expect("terminate");
    outer.expect_line("got-TERM");
    assert_eq!(
        outer.exit_code(),
        0,
        "COMMAND's own status, 0 after its trap"
    );
}

#[test]
fn sigkill_to_the_wrapper_takes_command_down() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("sigkill");
    let mut wrapper = cli(
        Some(&bus.address),
        lock_dir.path(),
        &[
            "run",
            &name,
            "--",
            "sh",
            "-c",
            "echo pid $$; exec sleep 600",
        ],
    );
    // Watch COMMAND's exit through a pidfd (it is not our child, so no waitpid).
    let (command_pid, pidfd) = command_pidfd(&mut wrapper);
    wrapper.sigkill();
    assert!(
        exits_within_timeout(&pidfd),
        "COMMAND (pid {command_pid}) still runs {TIMEOUT:?} after the wrapper was killed"
    );
    let mut next = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "echo", "next"],
    );
    next.expect_line("next");
    assert_eq!(next.exit_code(), 0);
}

#[test]
fn command_inherits_one_lock_descriptor_and_no_bus_socket() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("fds");
    let script = "echo \"env ${UNIQUE_INSTANCE_LOCK_FD-unset}\"; \
                  for f in /proc/$$/fd/*; do echo \"fd $f -> $(readlink $f)\"; done; echo end";
    // Each case: the backend, whether COMMAND gets the lock's descriptor, and whether the copy
    // would wait (its keeper is then started before acquiring, and handed the lock over its
    // socket). A stale UNIQUE_INSTANCE_LOCK_FD in the wrapper's environment (an outer `run`)
    // never reaches it.
    let cases = [("auto", true), ("dbus", false)]
        .into_iter()
        .flat_map(|(backend, has_lock)| [(backend, has_lock, false), (backend, has_lock, true)]);
    for (backend, has_lock, waits) in cases {
        let mut args = vec!["run", "--backend", backend, &name, "--", "sh", "-c", script];
        if waits {
            args.insert(1, "--wait");
        }
        let mut cmd = cli_command(Some(&bus.address), lock_dir.path(), &args);
        cmd.env("RUST_LOG", "unique_instance=debug")
            .env("UNIQUE_INSTANCE_LOCK_FD", "99999");
        let mut wrapper = Proc::spawn(cmd);
        let env = wrapper.next_line("COMMAND's UNIQUE_INSTANCE_LOCK_FD");
        let mut fds = Vec::new();
        loop {
            let line = wrapper.next_line("COMMAND's descriptors");
            if line == "end" {
                break;
            }
            fds.push(line);
        }
        assert_eq!(wrapper.exit_code(), 0, "{backend}, waits: {waits}");
        let stderr = wrapper.stderr_until_closed().join("\n");
        // The wrapper did hold what it says while COMMAND ran (so the checks below mean
        // something).
        let backends = if has_lock {
            "[LockFile, Dbus]"
        } else {
            "[Dbus]"
        };
        assert!(stderr.contains(&format!("backends={backends}")), "{stderr}");
        // The copy that would wait started its keeper before acquiring, and so did the one that
        // found the lock file free when it first looked (while the bus answered); with the bus
        // alone there is no such look, and a copy that does not wait starts it once it holds
        // the instance.
        assert_eq!(
            stderr.contains("keeper started before acquiring"),
            waits || has_lock,
            "{backend}: {stderr}"
        );
        assert!(fds.len() >= 3, "stdin, stdout and stderr at least: {fds:?}");
        for fd in &fds {
            assert!(!fd.contains("socket:"), "COMMAND inherited a socket: {fd}");
        }
        let locks: Vec<&String> = fds.iter().filter(|fd| fd.contains(".lock")).collect();
        if has_lock {
            let number = env.strip_prefix("env ").expect("env line");
            assert!(
                number.parse::<u32>().is_ok_and(|n| n >= 3) && number != "99999",
                "UNIQUE_INSTANCE_LOCK_FD names COMMAND's descriptor: {env:?}"
            );
            assert_eq!(
                locks.len(),
                1,
                "{backend}, waits: {waits}: exactly one descriptor of the lock: {fds:?}"
            );
            assert!(
                locks[0].starts_with("fd /proc/")
                    && locks[0].contains(&format!("/fd/{number} -> ")),
                "the lock's descriptor is the announced one ({number}): {locks:?}"
            );
        } else {
            assert_eq!(env, "env unset", "no lock file, nothing announced");
            assert!(
                locks.is_empty(),
                "waits: {waits}: COMMAND inherited a lock file: {locks:?}"
            );
        }
    }
}

/// A COMMAND's PID from its `pid N` line, as a pidfd to watch it by (it is not our child).
fn command_pidfd(wrapper: &mut Proc) -> (u32, rustix::fd::OwnedFd) {
    let line = wrapper.line_starting("pid ");
    let pid: u32 = line
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line:?}"));
    let pidfd = rustix::process::Pid::from_raw(pid as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
        .unwrap_or_else(|| panic!("process {pid} is not running"));
    (pid, pidfd)
}

/// Waits (poll, with [`TIMEOUT`]) until the process behind `pidfd` has exited.
fn wait_pidfd(pid: u32, pidfd: &rustix::fd::OwnedFd) {
    assert!(
        exits_within_timeout(pidfd),
        "process {pid} still runs after {TIMEOUT:?}"
    );
}

/// Has the process behind `pidfd` exited within [`TIMEOUT`]? (poll on the pidfd)
fn exits_within_timeout(pidfd: &rustix::fd::OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: TIMEOUT.as_secs() as i64,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).expect("poll") == 1
}

/// SIGKILLs, through its pidfd (never a reused PID), a process that is not our child when
/// dropped, so a failing test leaves none behind.
struct KillOnDrop<'a>(&'a rustix::fd::OwnedFd);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = rustix::process::pidfd_send_signal(self.0, Signal::KILL);
    }
}

#[test]
fn command_that_outlives_a_killed_wrapper_keeps_the_instance_held() {
    common::require_program("setpriv", "util-linux");
    common::require_program("setsid", "util-linux");
    let bus = DbusDaemon::start(BusConfig::Open);
    // Both escape PR_SET_PDEATHSIG: the kernel clears it when COMMAND changes its credentials,
    // and a process COMMAND forks (here in a session of its own) never had it. When the wrapper
    // is killed, COMMAND's keeper stops them (SIGTERM, SIGKILL after --kill-after): they ignore
    // SIGTERM, and the grace is long, so that they outlive the wrapper for the test's length.
    let cases = [
        (
            "setpriv",
            "setpriv --reuid=65534 --regid=65534 --clear-groups -- \
             sh -c 'trap \"\" TERM; echo pid $$; exec sleep 600'",
        ),
        (
            "setsid",
            "setsid sh -c 'trap \"\" TERM; echo pid $$; exec sleep 600' </dev/null & wait",
        ),
    ];
    for (case, script) in cases {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name(case);
        let mut wrapper = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["run", "--kill-after=600", &name, "--", "sh", "-c", script],
        );
        let (pid, pidfd) = command_pidfd(&mut wrapper);
        let _command = KillOnDrop(&pidfd);
        wrapper.sigkill();
        // COMMAND lives on, and so the instance must stay held: a second copy is refused.
        let mut second = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["run", &name, "--", "echo", "second copy ran"],
        );
        let stdout = second.stdout_until_closed();
        assert_eq!(
            second.exit_code(),
            75,
            "{case}: a copy started while COMMAND (pid {pid}) outlives the killed wrapper must \
             be refused; its stdout: {stdout:?}"
        );
        let stderr = second.stderr_until_closed().join("\n");
        assert!(stderr.contains("is already running"), "{case}: {stderr}");
        // Once COMMAND is gone the instance is free (the keeper sees it end, and exits: a wait
        // bounded by the test's timeout covers the moment between the two).
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
        assert_a_waiting_copy_runs(Some(&bus.address), lock_dir.path(), &name, case);
    }
}

#[test]
fn bounded_wait_times_out_and_unbounded_wait_takes_over() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("wait");
    let mut holder = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD],
    );
    holder.line_starting("running");

    let started = Instant::now();
    let mut bounded = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", "--wait=1", &name, "--", "echo", "ran"],
    );
    assert_eq!(bounded.exit_code(), 75);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up before its second"
    );
    let stderr = bounded.stderr_until_closed().join("\n");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", holder.pid())),
        "{stderr}"
    );

    let mut cmd = cli_command(
        Some(&bus.address),
        lock_dir.path(),
        &["run", "--wait", &name, "--", "echo", "ran"],
    );
    cmd.env("RUST_LOG", "unique_instance=info");
    let mut waiter = Proc::spawn(cmd);
    waiter.stderr_line_containing("waiting for the running copy to exit");
    holder.close_stdin();
    assert_eq!(holder.exit_code(), 0);
    waiter.expect_line("ran");
    assert_eq!(waiter.exit_code(), 0);
}

#[test]
fn invalid_name_is_a_usage_error_and_creates_nothing() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for name in [
        "nodots",
        "org..Empty",
        "org.1digit.Start",
        ":1.42",
        "org.bad/char.X",
    ] {
        let mut run = cli(None, lock_dir.path(), &["run", name, "--", "touch", "ran"]);
        assert_eq!(run.exit_code(), 64, "{name}");
        let stderr = run.stderr_until_closed().join("\n");
        assert!(stderr.contains("invalid instance name"), "{name}: {stderr}");
    }
    let mut usage = cli(None, lock_dir.path(), &["run", "org.example.NoCommand"]);
    assert_eq!(usage.exit_code(), 64, "a missing COMMAND is a usage error");
    let left: Vec<_> = std::fs::read_dir(lock_dir.path())
        .expect("read_dir")
        .collect();
    assert!(left.is_empty(), "something was created: {left:?}");
}

#[test]
fn system_bus_policy_denial_is_not_permitted() {
    let bus = DbusDaemon::start(BusConfig::DenyOwn);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("policy");
    let mut cmd = cli_command(
        None,
        lock_dir.path(),
        &["run", "--system", &name, "--", "echo", "ran"],
    );
    cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    let mut run = Proc::spawn(cmd);
    assert_eq!(run.exit_code(), 77);
    assert_eq!(
        run.stdout_until_closed(),
        Vec::<String>::new(),
        "COMMAND ran"
    );
    let stderr = run.stderr_until_closed().join("\n");
    assert!(stderr.contains("bus policy"), "{stderr}");
    assert!(!stderr.contains("already running"), "{stderr}");
}

/// `status --backend dbus` on a bus it cannot reach checked nothing: it says so (69, as a
/// copy with no usable backend), never "not running" (3), on which a monitor would start a
/// second copy while one may own the name (a review: 3, "nothing could be checked").
#[test]
fn status_that_could_check_nothing_does_not_say_not_running() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status_unchecked");
    let nowhere = format!("unix:path={}", lock_dir.path().join("no-bus").display());
    let mut status = cli(
        Some(&nowhere),
        lock_dir.path(),
        &["status", "--backend", "dbus", &name],
    );
    let code = status.exit_code();
    let stderr = status.stderr_until_closed().join("\n");
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("nothing could be checked"), "{stderr}");
}

/// Nor when the bus is reached but will not say who owns the name (a policy that denies
/// `GetNameOwner`): the name may be owned, and is (a review: "not running", 3).
#[test]
fn status_that_the_bus_does_not_answer_does_not_say_not_running() {
    let bus = DbusDaemon::start_with(
        BusConfig::Open,
        r#"<policy context="default">
             <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
                   send_member="GetNameOwner"/>
           </policy>"#,
    );
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status_denied");
    let mut owner = common::holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    assert!(owner.next_line("holder").starts_with("acquired"));
    let mut status = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--backend", "dbus", &name],
    );
    let code = status.exit_code();
    let stderr = status.stderr_until_closed().join("\n");
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("did not say who owns"), "{stderr}");
    owner.close_stdin();
    assert_eq!(owner.line_starting("released"), "released");
}

#[test]
fn status_reports_the_holder_then_not_running() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status");
    let mut holder = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD],
    );
    holder.line_starting("running");
    let pid = holder.pid();

    let mut human = cli(Some(&bus.address), lock_dir.path(), &["status", &name]);
    let line = human.next_line("status");
    assert_eq!(human.exit_code(), 0);
    assert!(line.contains(&format!("is running (pid {pid},")), "{line}");

    let mut json = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let line = json.next_line("status --json");
    assert_eq!(json.exit_code(), 0);
    let v: serde_json::Value = serde_json::from_str(&line).expect("status --json is JSON");
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["running"], true);
    assert_eq!(v["pid"], pid);
    assert_eq!(v["scope"], "system", "root's lock file is the system one");
    assert_eq!(v["found_by"], "dbus");
    assert_eq!(v["bus"], "session");
    assert!(
        v["bus_unique_name"]
            .as_str()
            .is_some_and(|u| u.starts_with(":1.")),
        "{v}"
    );
    assert!(v["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{v}");
    for field in ["uid", "executable", "hostname", "lock_file"] {
        assert!(v.get(field).is_some(), "missing {field}: {v}");
    }

    holder.close_stdin();
    assert_eq!(holder.exit_code(), 0);
    let mut after = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let line = after.next_line("status --json after");
    assert_eq!(after.exit_code(), 3);
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(v["running"], false);
    assert_eq!(v["pid"], serde_json::Value::Null);
}

#[test]
fn status_reports_the_bus_owner_and_a_different_lock_holder_apart() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("status_apart");
    // One process owns the name on the bus and holds no lock file; another holds the lock file
    // and never asks the bus.
    let mut owner = common::holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "dbus"],
    );
    owner.line_starting("acquired");
    let mut locker = common::holder(
        Some(&bus.address),
        lock_dir.path(),
        &[&name, "--backend", "lockfile"],
    );
    locker.line_starting("acquired");
    let (owner_pid, locker_pid) = (owner.pid(), locker.pid());

    let mut human = cli(Some(&bus.address), lock_dir.path(), &["status", &name]);
    let lines = human.stdout_until_closed();
    assert_eq!(human.exit_code(), 0, "{lines:?}");
    let owner_line = lines
        .iter()
        .find(|l| l.contains(&format!("pid {owner_pid},")))
        .unwrap_or_else(|| panic!("the bus name's owner {owner_pid} is named: {lines:?}"));
    assert!(
        !owner_line.contains("lock file"),
        "the bus name's owner {owner_pid} is not said to hold the lock file: {lines:?}"
    );
    let locker_line = lines
        .iter()
        .find(|l| l.contains(&format!("pid {locker_pid},")))
        .unwrap_or_else(|| panic!("the lock file's holder {locker_pid} is named: {lines:?}"));
    assert!(
        locker_line.contains("lock file") && locker_line.contains("different process"),
        "{lines:?}"
    );

    let mut json = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let line = json.next_line("status --json");
    assert_eq!(json.exit_code(), 0);
    let v: serde_json::Value = serde_json::from_str(&line).expect("status --json is JSON");
    // The fields of before: the bus name's owner, found through the bus.
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["pid"], owner_pid, "{v}");
    assert_eq!(v["found_by"], "dbus", "{v}");
    assert_eq!(
        v["hostname"],
        serde_json::Value::Null,
        "not the lock file's: {v}"
    );
    // And each backend's holder on its own.
    assert_eq!(v["holders_differ"], true, "{v}");
    assert_eq!(v["bus_owner"]["pid"], owner_pid, "{v}");
    assert_eq!(v["lock_file_holder"]["pid"], locker_pid, "{v}");
    assert!(v["lock_file_holder"]["lock_file"].is_string(), "{v}");

    // One process holding both is one holder, as before. (Released, not killed: the bus has
    // let the name go once the owner has exited.)
    for mut holder in [owner, locker] {
        holder.close_stdin();
        assert_eq!(holder.exit_code(), 0);
    }
    let mut both = common::holder(Some(&bus.address), lock_dir.path(), &[&name]);
    both.line_starting("acquired");
    let mut json = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["status", "--json", &name],
    );
    let v: serde_json::Value =
        serde_json::from_str(&json.next_line("status --json")).expect("JSON");
    assert_eq!(json.exit_code(), 0);
    assert_eq!(v["holders_differ"], false, "{v}");
    assert_eq!(v["pid"], both.pid(), "{v}");
    assert_eq!(v["lock_file_holder"]["pid"], both.pid(), "{v}");
    assert_eq!(v["bus_owner"]["pid"], both.pid(), "{v}");
    assert!(v["hostname"].is_string(), "merged with the record: {v}");
}

#[test]
fn lock_file_removed_or_replaced_stops_command() {
    for replace in [false, true] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("removed");
        let script = "trap 'echo got-TERM; exit 0' TERM; echo ready; \
                      sleep 60 </dev/null >/dev/null 2>&1 & wait";
        let mut wrapper = cli(
            None,
            lock_dir.path(),
            &["run", &name, "--", "sh", "-c", script],
        );
        wrapper.expect_line("ready");
        let lock_file = lock_dir.path().join(format!("{name}.lock"));
        if replace {
            let other = lock_dir.path().join("other");
            std::fs::write(&other, "").expect("write");
            std::fs::rename(&other, &lock_file).expect("rename over the lock file");
        } else {
            // Removed with its directory (a file removed alone is re-created: see
            // tests/loss.rs), while the wrapper is stopped, so that it cannot re-create the file
            // between the two.
            wrapper.stop();
            std::fs::remove_file(&lock_file).expect("remove lock file");
            std::fs::remove_dir(lock_dir.path()).expect("remove the lock directory");
            wrapper.signal(rustix::process::Signal::CONT);
        }
        // No periodic re-check was asked for: the inotify watch sees it.
        wrapper.expect_line("got-TERM");
        assert_eq!(wrapper.exit_code(), 69);
        let stderr = wrapper.stderr_until_closed().join("\n");
        let expected = if replace {
            "the lock file was replaced"
        } else {
            "the lock file was removed"
        };
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn command_that_ignores_sigterm_is_killed_after_the_grace() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("kill_after");
    let script = "trap 'echo ignored-TERM' TERM; echo ready; while :; do sleep 60 </dev/null >/dev/null 2>&1 & wait; done";
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--recheck=0.1",
            "--kill-after=0.3",
            &name,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    wrapper.expect_line("ready");
    // Replaced (a file removed alone would be re-created, and nothing lost).
    let other = lock_dir.path().join("other");
    std::fs::write(&other, "").expect("write");
    std::fs::rename(&other, lock_dir.path().join(format!("{name}.lock")))
        .expect("rename over the lock file");
    wrapper.expect_line("ignored-TERM");
    assert_eq!(
        wrapper.exit_code(),
        69,
        "SIGKILL came, and the loss is reported"
    );
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("stopped because the instance was lost"),
        "{stderr}"
    );
}

/// The wrapper passed SIGTERM on to COMMAND, then died by SIGKILL (what systemd does once
/// `TimeoutStopSec` is up, with `KillMode=mixed`): the keeper must not send COMMAND a second
/// SIGTERM — many programs take a second one as "stop now, skip the clean-up" — but only what
/// COMMAND left, which got none, and SIGKILL after the grace.
#[test]
fn command_already_sent_sigterm_gets_no_second_one_from_the_keeper() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("one_sigterm");
    // COMMAND (perl: Essential in Debian) and a child it forks share a handler that says who
    // got the signal; neither exits by itself.
    let script = "$| = 1; my $command = $$; \
                  $SIG{TERM} = sub { print $$ == $command ? qq(TERM\\n) : qq(child TERM\\n) }; \
                  defined(my $child = fork) or die; print qq(ready\\n) if $child; sleep while 1";
    // `lock-file`, as the README names the backend, is taken as well as `lockfile`.
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--backend=lock-file",
            "--kill-after=0.5",
            &name,
            "--",
            "perl",
            "-e",
            script,
        ],
    );
    wrapper.expect_line("ready");
    wrapper.signal(Signal::TERM);
    wrapper.expect_line("TERM");
    wrapper.sigkill();
    let after = wrapper.stdout_until_closed();
    assert_eq!(
        after,
        ["child TERM"],
        "after the wrapper died, only COMMAND's child is sent SIGTERM; stderr: {:?}",
        wrapper.stderr_lines()
    );
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "once the tree is gone");
}

#[test]
fn bus_loss_with_lock_file_held_keeps_command_running() {
    let mut bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("bus_gone");
    let mut wrapper = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD],
    );
    wrapper.line_starting("running");
    bus.kill();
    wrapper.stderr_line_containing("COMMAND goes on");
    // Still excluded through the lock file, even for a copy with no bus at all.
    let mut second = cli(None, lock_dir.path(), &["run", &name, "--", "true"]);
    assert_eq!(second.exit_code(), 75);
    wrapper.close_stdin();
    wrapper.expect_line("done");
    assert_eq!(wrapper.exit_code(), 0);
}

#[test]
fn man_page_and_completions_are_generated() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let mut man = cli(None, lock_dir.path(), &["man"]);
    let first = man.next_line("man page");
    assert!(
        first.starts_with(".ie") || first.starts_with(".TH"),
        "{first}"
    );
    let rest = man.stdout_until_closed().join("\n");
    assert!(
        rest.contains("Exit status"),
        "the man page documents exit codes"
    );
    assert_eq!(man.exit_code(), 0);
    // A place the pages cannot go is the caller's to fix: named, an I/O error (74), not an
    // internal one (70).
    let missing = lock_dir.path().join("no/such/dir");
    let mut man = cli(
        None,
        lock_dir.path(),
        &["man", "--out-dir", missing.to_str().expect("utf-8")],
    );
    assert_eq!(man.exit_code(), 74);
    let said = man.stderr_until_closed().join("\n");
    assert!(said.contains(&missing.display().to_string()), "{said}");
    let mut bash = cli(None, lock_dir.path(), &["completions", "bash"]);
    let script = bash.stdout_until_closed().join("\n");
    assert_eq!(bash.exit_code(), 0);
    assert!(
        script.contains("complete -F") && script.contains("--conflict-exit-code"),
        "{script}"
    );
}

#[test]
fn log_lines_are_plain_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("journal");
    let mut first_words = Vec::new();
    for journal in [false, true] {
        // A file stands in for the journal's stream: JOURNAL_STREAM names its device and inode.
        let log = tempfile::NamedTempFile::new().expect("log file");
        let meta = log.as_file().metadata().expect("stat");
        let mut cmd = cli_command(None, lock_dir.path(), &["run", &name, "--", "true"]);
        cmd.env("RUST_LOG", "unique_instance=debug")
            .stderr(log.reopen().expect("reopen"));
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let status = common::status_within_timeout(cmd);
        assert!(status.success());
        let text = std::fs::read_to_string(log.path()).expect("read log");
        let first = text
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no log lines: {text:?}"));
        assert!(
            !first.contains('\u{1b}'),
            "colour escapes in a non-terminal log: {first}"
        );
        first_words.push(first.split_whitespace().next().unwrap_or("").to_owned());
    }
    assert!(
        first_words[0].starts_with("20") && first_words[0].ends_with('Z'),
        "a terminal or file log line starts with a timestamp: {first_words:?}"
    );
    assert!(
        ["DEBUG", "INFO", "WARN"].contains(&first_words[1].as_str()),
        "a journal line starts with its level, no timestamp: {first_words:?}"
    );
}

#[test]
fn processes_command_leaves_behind_are_stopped_before_release() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("leftovers");
    // COMMAND exits at once, leaving a background job that ignores SIGTERM and has a child of
    // its own: both are still the guarded work, and must be gone before the instance is free.
    // COMMAND exits only once the job has set its trap and started its child (it says so
    // through a FIFO), or a loaded machine could see COMMAND's exit first.
    let fifo_dir = tempfile::tempdir().expect("tempdir");
    let fifo = fifo_dir.path().join("ready");
    let script = "mkfifo \"$1\"; \
                  (trap '' TERM; sleep 600 </dev/null >/dev/null 2>&1 & echo grandchild $!; \
                   echo ready > \"$1\"; wait) </dev/null 2>/dev/null & \
                  echo child $!; read _ < \"$1\"; exit 5";
    let fifo_arg = fifo.to_str().expect("utf-8 path");
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--kill-after=0.3",
            &name,
            "--",
            "sh",
            "-c",
            script,
            "sh",
            fifo_arg,
        ],
    );
    let mut pids = Vec::new();
    for _ in 0..2 {
        let line = wrapper.next_line("a leftover's pid");
        let pid: i32 = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        pids.push(pid);
    }
    assert_eq!(wrapper.exit_code(), 5, "COMMAND's own status");
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(stderr.contains("left 1 process(es) running"), "{stderr}");
    for pid in pids {
        let pid = rustix::process::Pid::from_raw(pid).expect("pid");
        assert_eq!(
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).err(),
            Some(rustix::io::Errno::SRCH),
            "leftover {pid:?} outlived the wrapper"
        );
    }
}

#[test]
fn out_of_range_inputs_are_clear_errors_not_panics() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("inputs");
    // Each: the arguments before NAME, and what the message must say. COMMAND never runs.
    let cases: [(&[&str], &str); 4] = [
        (&["--wait=1e19"], "too many seconds"),
        (&["--kill-after", "1e19"], "too many seconds"),
        (&["--recheck", "1e-9"], "too short an interval"),
        (&["--recheck", "inf"], "too many seconds"),
    ];
    for (options, says) in cases {
        let mut args = vec!["run"];
        args.extend_from_slice(options);
        args.extend_from_slice(&[&name, "--", "echo", "COMMAND ran"]);
        let mut run = cli(None, lock_dir.path(), &args);
        assert_eq!(run.exit_code(), 64, "{options:?} is a usage error");
        assert_eq!(
            run.stdout_until_closed(),
            Vec::<String>::new(),
            "{options:?}"
        );
        let stderr = run.stderr_until_closed().join("\n");
        let option = options[0].split('=').next().expect("option");
        assert!(
            stderr.contains(says) && stderr.contains(option),
            "{options:?}: the message names the option and the problem: {stderr}"
        );
    }
    // An open-file limit too low for the runtime's signal pipe once made tokio panic.
    let prlimit = common::require_program("prlimit", "util-linux");
    for nofile in [6, 7, 8] {
        for command in [
            &["run", &name, "--", "echo", "COMMAND ran"][..],
            &["status", &name],
        ] {
            let mut cmd = cli_command(None, lock_dir.path(), command);
            let program = cmd.get_program().to_owned();
            let mut limited = std::process::Command::new(&prlimit);
            limited
                .arg(format!("--nofile={nofile}"))
                .arg("--")
                .arg(program)
                .args(cmd.get_args())
                .env_clear()
                .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
            cmd = limited;
            let mut run = Proc::spawn(cmd);
            let code = run.exit_code();
            let stderr = run.stderr_until_closed().join("\n");
            assert_eq!(code, 70, "nofile={nofile} {command:?}: {stderr}");
            assert!(
                stderr.contains("RLIMIT_NOFILE") && !stderr.contains("panicked"),
                "nofile={nofile} {command:?}: {stderr}"
            );
            assert_eq!(run.stdout_until_closed(), Vec::<String>::new());
        }
    }
}

#[test]
fn signals_during_the_clean_up_reach_what_command_left() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("cleanup_signals");
    // COMMAND exits, leaving a job that reports each SIGTERM: the first is the wrapper's
    // clean-up; the second is ours, sent to the wrapper during the clean-up (a grace of 20 s
    // keeps it there), and must be passed on like any signal while COMMAND ran. COMMAND exits
    // only once the job's trap is set (it says so through a FIFO).
    let fifo_dir = tempfile::tempdir().expect("tempdir");
    let fifo = fifo_dir.path().join("ready");
    let script = "mkfifo \"$1\"; \
                  (trap 'if [ -n \"$t\" ]; then echo term-again; exit 0; fi; t=1; echo term' TERM; \
                   sleep 600 </dev/null >/dev/null 2>&1 & echo ready > \"$1\"; \
                   while :; do wait $!; done) </dev/null 2>/dev/null & \
                  read _ < \"$1\"; exit 4";
    let fifo_arg = fifo.to_str().expect("utf-8 path");
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            // Long enough that our SIGTERM comes within it; short enough that the test still
            // ends if the `sleep` the job leaves was not stopped by a signal of ours (then the
            // grace's SIGKILL ends it; "term-again" can only come from our SIGTERM).
            "--kill-after=20",
            &name,
            "--",
            "sh",
            "-c",
            script,
            "sh",
            fifo_arg,
        ],
    );
    wrapper.expect_line("term");
    wrapper.signal(Signal::TERM);
    assert_eq!(
        wrapper.next_line("our SIGTERM, passed on during the clean-up"),
        "term-again"
    );
    assert_eq!(wrapper.exit_code(), 4, "COMMAND's own status");
}

#[test]
fn a_signal_between_acquiring_and_starting_command_ends_the_wrapper() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("signal_before_spawn");
    // A build with the test hooks stops itself (SIGSTOP) right after acquiring, before COMMAND starts, when
    // this variable is set: the moment a signal used to be lost.
    let mut cmd = cli_command(
        None,
        lock_dir.path(),
        &["run", &name, "--", "echo", "COMMAND ran"],
    );
    common::arm_test_hook(&mut cmd, "UNIQUE_INSTANCE_TEST_STOP_BEFORE_SPAWN");
    let wrapper = Proc::spawn(cmd);
    let pid = rustix::process::Pid::from_raw(wrapper.pid() as i32).expect("pid");
    let stopped = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::UNTRACED)
        .expect("waitpid")
        .expect("a status");
    assert!(
        stopped.1.stopped(),
        "the wrapper stopped before COMMAND: {stopped:?}"
    );
    let mut wrapper = wrapper;
    wrapper.signal(Signal::INT);
    wrapper.signal(Signal::CONT);
    assert_eq!(wrapper.exit_code(), 130, "128 + SIGINT");
    assert_eq!(
        wrapper.stdout_until_closed(),
        Vec::<String>::new(),
        "COMMAND was not started"
    );
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(stderr.contains("COMMAND was not started"), "{stderr}");
    // And the instance was released.
    let mut next = cli(None, lock_dir.path(), &["run", &name, "--", "echo", "next"]);
    next.expect_line("next");
    assert_eq!(next.exit_code(), 0);
}

/// A COMMAND whose descendants close the lock descriptor they inherited (Python's `subprocess`
/// does by default; daemons call `closefrom`) and leave its session: when the wrapper is
/// SIGKILLed they hold nothing, never had `PR_SET_PDEATHSIG`, and used to run on under init
/// while a new copy started beside them. Now COMMAND's keeper process holds the instance until
/// the last of them is gone, and stops them itself: one that ends at SIGTERM is gone, one that
/// ignores it keeps the instance held (with a long `--kill-after`) until it is gone. The same
/// for a copy that first waited for the instance (`--wait`): its keeper, started before the
/// wait, is the one that runs COMMAND.
#[test]
fn descendants_that_closed_the_lock_keep_the_instance_held_after_the_wrapper_is_killed() {
    common::require_program("setsid", "util-linux");
    // dash cannot name a descriptor above 9 in a redirection; bash can.
    common::require_program("bash", "bash");
    let bus = DbusDaemon::start(BusConfig::Open);
    for waits in [false, true] {
        closed_lock_case(&bus, waits);
    }
}

fn closed_lock_case(bus: &DbusDaemon, waits: bool) {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("closed_lock_fd");
    // Two grandchildren, each in a session of its own with the lock's descriptor closed: the
    // first ends at SIGTERM, the second ignores it. Each says `stops N` or `stays N` once it
    // runs (in either order).
    let grandchild = |ignore_term: bool| {
        if ignore_term {
            "setsid sh -c 'trap \"\" TERM; echo stays $$; exec sleep 600' </dev/null & "
        } else {
            "setsid sh -c 'echo stops $$; exec sleep 600' </dev/null & "
        }
    };
    let script = format!(
        "eval \"exec $UNIQUE_INSTANCE_LOCK_FD>&-\"; {}{}wait",
        grandchild(false),
        grandchild(true)
    );
    // NAME is bash's $0: it marks this case's keeper.
    let mut args = vec![
        "run",
        "--kill-after=600",
        &name,
        "--",
        "bash",
        "-c",
        &script,
        &name,
    ];
    let mut prestarted = None;
    let mut wrapper = if waits {
        let mut holder = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["run", &name, "--", "sh", "-c", HOLD],
        );
        holder.line_starting("running");
        args.insert(1, "--wait");
        let mut cmd = cli_command(Some(&bus.address), lock_dir.path(), &args);
        cmd.env("RUST_LOG", "unique_instance=info");
        let mut wrapper = Proc::spawn(cmd);
        wrapper.stderr_line_containing("waiting for the running copy to exit");
        prestarted = Some(the_keeper(&wrapper, &name));
        holder.close_stdin();
        assert_eq!(holder.exit_code(), 0);
        wrapper
    } else {
        cli(Some(&bus.address), lock_dir.path(), &args)
    };
    let mut grandchildren = Vec::new();
    for _ in 0..2 {
        let line = wrapper.next_line("a grandchild's pid");
        let (word, pid) = line
            .split_once(' ')
            .and_then(|(w, p)| Some((w.to_owned(), p.parse::<u32>().ok()?)))
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let pidfd = rustix::process::Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .unwrap_or_else(|| panic!("process {pid} is not running"));
        grandchildren.push((word, pid, pidfd));
    }
    // COMMAND runs under the keeper; when the copy waited, under the one started before.
    let keeper = the_keeper(&wrapper, &name);
    if let Some(prestarted) = prestarted {
        assert_eq!(
            keeper, prestarted,
            "COMMAND runs under the keeper started before the wait"
        );
    }
    // The one that ends at SIGTERM first.
    grandchildren.sort_by(|a, b| a.0.cmp(&b.0).reverse());
    assert_eq!(
        grandchildren
            .iter()
            .map(|g| g.0.as_str())
            .collect::<Vec<_>>(),
        ["stops", "stays"]
    );
    let _kill = grandchildren
        .iter()
        .map(|(_, _, pidfd)| KillOnDrop(pidfd))
        .collect::<Vec<_>>();
    for (_, pid, _) in &grandchildren {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the grandchild's fds");
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().contains(".lock"),
                "grandchild {pid} still has the lock open: {target:?}"
            );
        }
    }
    wrapper.sigkill();
    // The second lives on (it ignores SIGTERM, and SIGKILL comes only after --kill-after): the
    // instance must stay held.
    let (_, survivor, survivor_fd) = &grandchildren[1];
    let mut second = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "echo", "second copy ran"],
    );
    let stdout = second.stdout_until_closed();
    assert_eq!(
        second.exit_code(),
        75,
        "waits: {waits}: a copy started while a grandchild (pid {survivor}) that closed the lock \
         descriptor outlives the killed wrapper must be refused; its stdout: {stdout:?}"
    );
    let stderr = second.stderr_until_closed().join("\n");
    assert!(stderr.contains("is already running"), "{stderr}");
    // The first, which ends at SIGTERM, was stopped, although the wrapper is gone.
    let (_, stopped, stopped_fd) = &grandchildren[0];
    wait_pidfd(*stopped, stopped_fd);
    // Once the second is gone, the instance is free (the keeper sees it end, and exits: a wait bounded
    // by the test's timeout covers the moment between the two).
    rustix::process::pidfd_send_signal(survivor_fd, Signal::KILL).expect("kill the grandchild");
    wait_pidfd(*survivor, survivor_fd);
    assert_a_waiting_copy_runs(Some(&bus.address), lock_dir.path(), &name, "");
}

/// A lock file removed while `run` holds it (an administrator cleaning `/run/lock`, a tmp
/// cleaner) is re-created by the wrapper, and the keeper must hold the new file too: it held a
/// duplicate of the removed one only, so once the wrapper was SIGKILLed nothing held the new
/// file, and a second copy ran while the keeper was still stopping COMMAND (which ignores
/// SIGTERM here, with a long `--kill-after`). The wrapper now hands each re-created file to its
/// keeper, and the second copy is refused for as long as the tree lives. With the lock file
/// alone, and with the bus name too.
#[test]
fn a_recreated_lock_file_is_handed_to_the_keeper() {
    use std::os::unix::fs::MetadataExt;
    let bus = DbusDaemon::start(BusConfig::Open);
    for with_bus in [false, true] {
        let address = with_bus.then_some(bus.address.as_str());
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("recreated_keeper");
        let path = lock_dir.path().join(format!("{name}.lock"));
        // NAME is sh's $0: it marks this case's keeper.
        let script = "trap '' TERM; echo pid $$; exec sleep 600";
        let mut wrapper = cli(
            address,
            lock_dir.path(),
            &[
                "run",
                "--kill-after=600",
                &name,
                "--",
                "sh",
                "-c",
                script,
                &name,
            ],
        );
        let (pid, pidfd) = command_pidfd(&mut wrapper);
        let _command = KillOnDrop(&pidfd);
        let keeper = the_keeper(&wrapper, &name);
        let old = std::fs::metadata(&path).expect("the lock file");
        std::fs::remove_file(&path).expect("remove the lock file");
        wrapper.stderr_line_containing("re-created");
        let new = std::fs::metadata(&path).expect("re-created");
        assert_ne!(new.ino(), old.ino(), "bus={with_bus}: a new file");
        // The wrapper hands the new file over once it re-created it: an external change, looked
        // for until it shows (bounded by the test's timeout).
        let handed = holds_file(keeper, new.dev(), new.ino());
        wrapper.sigkill();
        let mut second = cli(
            address,
            lock_dir.path(),
            &["run", &name, "--", "echo", "second copy ran"],
        );
        let stdout = second.stdout_until_closed();
        assert_eq!(
            second.exit_code(),
            75,
            "bus={with_bus}: a copy started while COMMAND (pid {pid}) outlives the killed \
             wrapper must be refused (the keeper {} the re-created lock file); its stdout: \
             {stdout:?}",
            if handed { "held" } else { "never got" }
        );
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(
            rustix::event::poll(&mut fds, Some(&zero)).expect("poll"),
            0,
            "bus={with_bus}: COMMAND still runs"
        );
        assert!(
            handed,
            "bus={with_bus}: the keeper holds the re-created file"
        );
        // Once COMMAND is gone the keeper exits, and the instance is free.
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
        assert_a_waiting_copy_runs(address, lock_dir.path(), &name, &format!("bus={with_bus}"));
    }
}

/// Does process `pid` hold a descriptor of the file (`dev`, `ino`)? Looked for until it does,
/// up to [`TIMEOUT`].
fn holds_file(pid: u32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the process's fds");
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path()).is_ok_and(|st| st.dev() == dev && st.ino() == ino)
        });
        if holds {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// With the bus name alone (`--backend dbus`: no lock file), the keeper holds a duplicate of the
/// bus connection's socket: when the wrapper is SIGKILLed the bus keeps the name owned until the
/// keeper has stopped COMMAND's whole tree (gracefully: SIGTERM, SIGKILL after --kill-after), so
/// a second copy is refused while a descendant that ignores SIGTERM lives.
#[test]
fn with_the_bus_alone_the_name_stays_owned_until_the_tree_is_gone() {
    common::require_program("setsid", "util-linux");
    common::require_program("bash", "bash");
    let bus = DbusDaemon::start(BusConfig::Open);
    outlives_the_wrapper(&bus, "dbus", false, |wrapper| wrapper.sigkill());
}

/// A bus that exits frees the name whatever the keeper holds: with the bus name alone the
/// keeper, which was stopping the tree gracefully after the wrapper was killed, then kills what
/// is left at once (SIGKILL), since nothing excludes a new copy any more.
#[test]
fn with_the_bus_alone_a_bus_that_exits_ends_the_grace() {
    let mut bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("bus_exits");
    let mut wrapper = cli(
        Some(&bus.address),
        lock_dir.path(),
        &[
            "run",
            "--backend",
            "dbus",
            "--kill-after=600",
            &name,
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo pid $$; while :; do sleep 1; done",
        ],
    );
    let (command, pidfd) = command_pidfd(&mut wrapper);
    let _command = KillOnDrop(&pidfd);
    wrapper.sigkill();
    // The keeper holds the name, and gives COMMAND its grace.
    wrapper.stderr_line_containing("holds the instance while it stops");
    bus.kill();
    assert!(
        exits_within_timeout(&pidfd),
        "COMMAND (pid {command}), which ignores SIGTERM, still runs {TIMEOUT:?} after the bus \
         exited and freed the name: it ran unguarded beside any new copy"
    );
}

/// `kill -9 -PGID` of the wrapper's process group (a terminal's or a supervisor's group kill)
/// kills the wrapper and COMMAND, but not the keeper, which has a process group of its own: it
/// stops what COMMAND left (daemons in sessions of their own, every descriptor closed) and holds
/// the instance until they are gone. COMMAND itself stays in the wrapper's process group (a
/// terminal's Ctrl-C and job control reach it).
#[test]
fn a_group_kill_of_the_wrapper_leaves_the_keeper_to_stop_the_tree() {
    common::require_program("setsid", "util-linux");
    common::require_program("bash", "bash");
    let bus = DbusDaemon::start(BusConfig::Open);
    for backend in ["auto", "dbus"] {
        outlives_the_wrapper(&bus, backend, true, |wrapper| {
            let group = rustix::process::Pid::from_raw(wrapper.pid() as i32).expect("pgid");
            rustix::process::kill_process_group(group, Signal::KILL).expect("kill -9 -PGID");
            let _ = wrapper.wait();
        });
    }
}

/// The process group of process `pid`, from its `/proc/PID/stat`.
fn process_group_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("bad stat {stat:?}"))
}

/// `run --backend BACKEND` (in a process group of its own when `new_group`) with a COMMAND
/// that leaves two daemons, each in a session of its own with every descriptor closed (the
/// lock's too): the first ends at SIGTERM, the second ignores it. Then `kill` kills the wrapper.
/// While the second lives a new copy is refused; the first is stopped; once the second is gone
/// (the test kills it) a new copy acquires.
fn outlives_the_wrapper(
    bus: &DbusDaemon,
    backend: &str,
    new_group: bool,
    kill: impl FnOnce(&mut Proc),
) {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("outlives_the_wrapper");
    let daemon = |ignore_term: bool| {
        let (trap, word) = if ignore_term {
            ("trap \"\" TERM; ", "stays")
        } else {
            ("", "stops")
        };
        format!(
            "setsid sh -c '{trap}echo {word} $$; exec sleep 600 </dev/null >/dev/null 2>&1' \
             </dev/null & "
        )
    };
    let script = format!(
        "echo command $$; [ -n \"$UNIQUE_INSTANCE_LOCK_FD\" ] && eval \"exec \
         $UNIQUE_INSTANCE_LOCK_FD>&-\"; {}{}wait",
        daemon(false),
        daemon(true)
    );
    // NAME is bash's $0: it marks this case's keeper.
    let args = [
        "run",
        "--backend",
        backend,
        "--kill-after=600",
        &name,
        "--",
        "bash",
        "-c",
        &script,
        &name,
    ];
    let mut cmd = cli_command(Some(&bus.address), lock_dir.path(), &args);
    if new_group {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    let mut wrapper = Proc::spawn(cmd);
    let line = wrapper.line_starting("command ");
    let command: u32 = line["command ".len()..]
        .parse()
        .unwrap_or_else(|_| panic!("bad line {line:?}"));
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let line = wrapper.next_line("a daemon's pid");
        let (word, pid) = line
            .split_once(' ')
            .and_then(|(w, p)| Some((w.to_owned(), p.parse::<u32>().ok()?)))
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let pidfd = rustix::process::Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .unwrap_or_else(|| panic!("process {pid} is not running"));
        daemons.push((word, pid, pidfd));
    }
    daemons.sort_by(|a, b| a.0.cmp(&b.0).reverse());
    assert_eq!(
        daemons.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["stops", "stays"]
    );
    let _kill = daemons
        .iter()
        .map(|(_, _, pidfd)| KillOnDrop(pidfd))
        .collect::<Vec<_>>();
    if new_group {
        // COMMAND is in the wrapper's process group, as a terminal's foreground job would be.
        assert_eq!(
            process_group_of(command),
            wrapper.pid(),
            "{backend}: COMMAND left the wrapper's process group"
        );
    }
    kill(&mut wrapper);
    let (_, survivor, survivor_fd) = &daemons[1];
    let mut second = cli(
        Some(&bus.address),
        lock_dir.path(),
        &[
            "run",
            "--backend",
            backend,
            &name,
            "--",
            "echo",
            "second copy ran",
        ],
    );
    let stdout = second.stdout_until_closed();
    assert_eq!(
        second.exit_code(),
        75,
        "{backend}: a copy started while a daemon (pid {survivor}) that COMMAND left outlives \
         the killed wrapper must be refused; its stdout: {stdout:?}"
    );
    let stderr = second.stderr_until_closed().join("\n");
    assert!(stderr.contains("is already running"), "{backend}: {stderr}");
    // It still lives (SIGKILL comes only after --kill-after): the refusal was for it.
    let mut fds = [rustix::event::PollFd::new(
        survivor_fd,
        rustix::event::PollFlags::IN,
    )];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(
        rustix::event::poll(&mut fds, Some(&now)).expect("poll"),
        0,
        "{backend}: the daemon that ignores SIGTERM was killed at once"
    );
    // The one that ends at SIGTERM was stopped, although the wrapper is gone.
    let (_, stopped, stopped_fd) = &daemons[0];
    wait_pidfd(*stopped, stopped_fd);
    // Once the survivor is gone the instance is free (the keeper sees it end, and exits: a wait
    // bounded by the test's timeout covers the moment between the two).
    rustix::process::pidfd_send_signal(survivor_fd, Signal::KILL).expect("kill the daemon");
    wait_pidfd(*survivor, survivor_fd);
    let mut third = cli(
        Some(&bus.address),
        lock_dir.path(),
        &[
            "run",
            "--backend",
            backend,
            "--wait=30",
            &name,
            "--",
            "echo",
            "third",
        ],
    );
    assert_eq!(
        third.next_line("the third copy's COMMAND"),
        "third",
        "{backend}"
    );
    assert_eq!(third.exit_code(), 0, "{backend}");
}

/// The keeper is an internal entry point: hidden from the help, and refusing to start by hand.
#[test]
fn the_keeper_entry_point_is_hidden_and_refuses_to_run_by_hand() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let mut help = cli(None, lock_dir.path(), &["--help"]);
    let text = help.stdout_until_closed().join("\n");
    assert_eq!(help.exit_code(), 0);
    assert!(text.contains("run") && !text.contains("keeper"), "{text}");
    let mut completions = cli(None, lock_dir.path(), &["completions", "bash"]);
    let script = completions.stdout_until_closed().join("\n");
    assert_eq!(completions.exit_code(), 0);
    assert!(script.contains("status") && !script.contains("keeper"));
    let mut by_hand = cli(
        None,
        lock_dir.path(),
        &[
            "internal-keeper",
            "--control-fd",
            "7",
            "--kill-after",
            "1",
            "--process-group",
            "1",
            "org.example.ByHand",
            "--",
            "echo",
            "COMMAND ran",
        ],
    );
    assert_eq!(by_hand.exit_code(), 64);
    assert_eq!(by_hand.stdout_until_closed(), Vec::<String>::new());
    let stderr = by_hand.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("started by `unique-instance run` only"),
        "{stderr}"
    );
}

/// The keeper ignores the signals the wrapper passes on: a terminal's Ctrl-C or systemd's
/// SIGTERM to the whole cgroup reaches it too, and it must neither die of them (COMMAND would
/// die with it) nor pass them on (the wrapper decides what COMMAND gets).
#[test]
fn the_keeper_survives_the_signals_the_wrapper_passes_on() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_signals");
    let script = "for s in TERM INT HUP QUIT USR1 USR2; do trap \"echo got-$s\" $s; done; \
                  echo running; read _; echo done";
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", script],
    );
    wrapper.expect_line("running");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", wrapper.pid()))
        .expect("the wrapper's children");
    let keeper: Vec<i32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(keeper.len(), 1, "the keeper is the wrapper's only child");
    let keeper = rustix::process::Pid::from_raw(keeper[0]).expect("pid");
    for signal in [
        Signal::TERM,
        Signal::INT,
        Signal::HUP,
        Signal::QUIT,
        Signal::USR1,
        Signal::USR2,
    ] {
        rustix::process::kill_process(keeper, signal).expect("signal the keeper");
    }
    // COMMAND still runs (had the keeper died, it would have been killed with it), and got
    // nothing: its next line is the one it prints when its stdin closes.
    wrapper.close_stdin();
    wrapper.expect_line("done");
    assert_eq!(wrapper.exit_code(), 0);
}

/// The keepers (`unique-instance internal-keeper ... -- COMMAND`) whose COMMAND has the argument
/// `marker`, each with its parent: every one on the machine, whoever's child it is.
fn keepers_with(marker: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Gone since the listing: not there.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        // Marked by COMMAND's arguments (after `--`): NAME is among the keeper's own too.
        let command = args
            .iter()
            .position(|&a| a == b"--")
            .map_or(&[][..], |at| &args[at + 1..]);
        if args.get(1) == Some(&b"internal-keeper".as_slice())
            && command.contains(&marker.as_bytes())
        {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0);
            found.push((pid, parent));
        }
    }
    found
}

/// The children of `pid`, zombies included (every thread's `children` list).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's tasks")
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    children
}

/// The wrapper's one child, which must be its keeper for a COMMAND with the argument `marker`.
fn the_keeper(wrapper: &Proc, marker: &str) -> u32 {
    let children = children_of(wrapper.pid());
    let keepers = keepers_with(marker);
    assert!(
        children.len() == 1 && keepers == [(children[0], wrapper.pid())],
        "the wrapper's only child is its keeper: children {children:?}, keepers {keepers:?}"
    );
    children[0]
}

/// The PID of the keeper the wrapper says it started before acquiring (its debug line).
fn early_keeper(wrapper: &mut Proc) -> u32 {
    let line = wrapper.stderr_line_containing("keeper started before acquiring");
    line.rsplit_once("pid=Pid(")
        .and_then(|(_, p)| p.trim_end_matches(')').parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// A copy that will wait starts its keeper before waiting (so that the keeper's start-up
/// overlaps the wait); when the wait ends without the instance — timed out, refused, or ended
/// by a signal — that keeper is gone before the wrapper exits: the wrapper has no child left,
/// not even a zombie, and no process with the keeper's arguments is left anywhere. A build with
/// the test hooks stops itself (SIGSTOP) right after ending that keeper when
/// UNIQUE_INSTANCE_TEST_STOP_AFTER_ABANDON is set, so that the test can look at that moment; it
/// exits normally once continued.
#[test]
fn a_wait_that_ends_without_the_instance_leaves_no_keeper_behind() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("prestart_leak");
    let mut holder = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD],
    );
    holder.line_starting("running");
    for case in ["timed out", "signalled", "refused"] {
        let marker = format!("{}-{}", name, case.replace(' ', "-"));
        let wait: &[&str] = match case {
            "timed out" => &["--wait=1"],
            "signalled" => &["--wait"],
            // No bus at all, for the bus alone: an error before any wait.
            _ => &["--wait", "--backend", "dbus"],
        };
        let bus_address = (case != "refused").then_some(bus.address.as_str());
        let mut args = vec!["run"];
        args.extend_from_slice(wait);
        args.extend_from_slice(&[&name, "--", "echo", "COMMAND ran", &marker]);
        let mut cmd = cli_command(bus_address, lock_dir.path(), &args);
        cmd.env("RUST_LOG", "unique_instance=debug");
        common::arm_test_hook(&mut cmd, "UNIQUE_INSTANCE_TEST_STOP_AFTER_ABANDON");
        let mut waiter = Proc::spawn(cmd);
        let keeper = if case == "refused" {
            early_keeper(&mut waiter)
        } else {
            waiter.stderr_line_containing("waiting for the running copy to exit");
            // Stopped, so that a bounded wait cannot end while we look.
            waiter.stop();
            let keeper = the_keeper(&waiter, &marker);
            if case == "signalled" {
                waiter.signal(Signal::TERM);
            }
            waiter.signal(Signal::CONT);
            keeper
        };
        waiter.wait_stopped(&format!("after ending its keeper ({case})"));
        assert_eq!(
            children_of(waiter.pid()),
            Vec::<u32>::new(),
            "{case}: the wrapper still has a child (its keeper was {keeper})"
        );
        assert_eq!(keepers_with(&marker), [], "{case}: a keeper is left");
        waiter.signal(Signal::CONT);
        let code = waiter.exit_code();
        assert_eq!(waiter.stdout_until_closed(), Vec::<String>::new(), "{case}");
        let stderr = waiter.stderr_until_closed().join("\n");
        assert!(!stderr.contains("COMMAND ran"), "{case}: {stderr}");
        match case {
            "timed out" => {
                assert_eq!(code, 75, "{stderr}");
                assert!(stderr.contains("timed out"), "{stderr}");
            }
            "signalled" => assert_eq!(code, 128 + 15, "{stderr}"),
            _ => {
                // As a copy that does not wait says it (it never starts a keeper).
                let mut plain = cli(
                    None,
                    lock_dir.path(),
                    &[
                        "run",
                        "--backend",
                        "dbus",
                        &name,
                        "--",
                        "echo",
                        "COMMAND ran",
                    ],
                );
                let plain_code = plain.exit_code();
                let plain_stderr = plain.stderr_until_closed();
                assert_ne!(plain_code, 0, "{plain_stderr:?}");
                assert_eq!(code, plain_code, "{stderr}");
                let said = |lines: &[String]| -> Vec<String> {
                    lines
                        .iter()
                        .filter(|l| l.starts_with("unique-instance: "))
                        .cloned()
                        .collect()
                };
                let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
                assert_eq!(said(&lines), said(&plain_stderr), "{case}");
            }
        }
        assert_eq!(keepers_with(&marker), [], "{case}: a keeper is left");
    }
    holder.close_stdin();
    assert_eq!(holder.exit_code(), 0);
}

/// A copy that does not wait but finds the lock file free when it first looks (most likely the
/// winner of a start-up storm) starts its keeper before its acquisition ends too (once it has
/// the lock file and has sent the bus its request), so that the keeper's start-up overlaps the
/// bus's answer: COMMAND runs under that keeper. Refused after all (here the
/// bus name is held by a copy that holds no lock file), it ends that keeper before exiting, as a
/// wait that ends without the instance does: no child, no keeper left, and COMMAND never ran.
#[test]
fn a_copy_that_finds_the_lock_file_free_starts_its_keeper_before_acquiring() {
    let bus = DbusDaemon::start(BusConfig::Open);
    let lock_dir = tempfile::tempdir().expect("tempdir");
    // NAME is sh's $0: it marks this keeper.
    let name = unique_name("early_keeper");
    let mut cmd = cli_command(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "sh", "-c", HOLD, &name],
    );
    cmd.env("RUST_LOG", "unique_instance=debug");
    let mut winner = Proc::spawn(cmd);
    let early = early_keeper(&mut winner);
    winner.line_starting("running");
    assert_eq!(
        the_keeper(&winner, &name),
        early,
        "COMMAND runs under the keeper started before acquiring"
    );
    winner.close_stdin();
    assert_eq!(winner.exit_code(), 0);

    let name = unique_name("early_keeper_refused");
    let mut holder = cli(
        Some(&bus.address),
        lock_dir.path(),
        &["run", "--backend", "dbus", &name, "--", "sh", "-c", HOLD],
    );
    holder.line_starting("running");
    let marker = format!("{name}-marker");
    let mut cmd = cli_command(
        Some(&bus.address),
        lock_dir.path(),
        &["run", &name, "--", "echo", "COMMAND ran", &marker],
    );
    cmd.env("RUST_LOG", "unique_instance=debug");
    common::arm_test_hook(&mut cmd, "UNIQUE_INSTANCE_TEST_STOP_AFTER_ABANDON");
    let mut copy = Proc::spawn(cmd);
    let keeper = early_keeper(&mut copy);
    copy.wait_stopped("after ending its keeper");
    assert_eq!(
        children_of(copy.pid()),
        Vec::<u32>::new(),
        "the wrapper still has a child (its keeper was {keeper})"
    );
    assert_eq!(keepers_with(&marker), [], "a keeper is left");
    copy.signal(Signal::CONT);
    let code = copy.exit_code();
    assert_eq!(copy.stdout_until_closed(), Vec::<String>::new());
    let stderr = copy.stderr_until_closed().join("\n");
    assert_eq!(code, 75, "{stderr}");
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(!stderr.contains("COMMAND ran"), "{stderr}");
    holder.close_stdin();
    assert_eq!(holder.exit_code(), 0);
}

/// Kills a process group when dropped: what a test's COMMAND left behind is gone even when the
/// test fails (a hung wrapper and keeper would not stop it).
struct KillGroup(Option<rustix::process::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
    }
}

/// COMMAND leaves thousands of processes behind: the wrapper has one `kill` order per process to
/// send the keeper, and the keeper a notice for each one that ends. Both used to block writing
/// to the control socket while neither read it: the instance stayed held for good, and the
/// wrapper no longer answered SIGTERM. Now a SIGTERM during the clean-up ends the wrapper, the
/// keeper and every leftover, with COMMAND's own status, and the instance is free again.
#[test]
fn thousands_of_leftovers_do_not_hang_the_clean_up() {
    common::require_program("setsid", "util-linux");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("many_leftovers");
    // COMMAND runs in a session (and process group) of its own, which the leftovers inherit:
    // the test can kill them all whatever happens to the wrapper and the keeper.
    let script = "echo group $$; i=0; \
                  while [ $i -lt 2000 ]; do sleep 600 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; \
                  echo spawned; exit 7";
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--kill-after=600",
            &name,
            "--",
            "setsid",
            "sh",
            "-c",
            script,
        ],
    );
    let group = wrapper.next_line("COMMAND's process group");
    let group: i32 = group
        .strip_prefix("group ")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("bad line {group:?}"));
    let group = rustix::process::Pid::from_raw(group).expect("pgid");
    let mut leftovers = KillGroup(Some(group));
    wrapper.expect_line("spawned");
    wrapper.stderr_line_containing("left 2000 process(es) running");
    wrapper.signal(Signal::TERM);
    assert_eq!(wrapper.exit_code(), 7, "COMMAND's own status");
    // The wrapper waits for the keeper, which reaps every leftover: none of the group is left.
    assert_eq!(
        rustix::process::test_kill_process_group(group).err(),
        Some(rustix::io::Errno::SRCH),
        "leftovers outlived the wrapper"
    );
    // Gone: its number may be reused from here on.
    leftovers.0 = None;
    let mut next = cli(None, lock_dir.path(), &["run", &name, "--", "echo", "next"]);
    next.expect_line("next");
    assert_eq!(next.exit_code(), 0);
}

/// The keeper alone killed by SIGKILL: COMMAND dies with it (`PR_SET_PDEATHSIG`), and whatever
/// was left is re-parented to the wrapper, which stops it. The wrapper fails (70, internal
/// error) and says what happened, not that COMMAND "may still be running".
#[test]
fn a_killed_keeper_is_reported_truthfully() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("killed_keeper");
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            &name,
            "--",
            "sh",
            "-c",
            "trap 'echo got-usr1' USR1; echo running; while :; do sleep 600 & wait $!; done",
        ],
    );
    wrapper.expect_line("running");
    // The wrapper passes signals on only once it knows COMMAND runs: after this, the keeper's
    // death is one while COMMAND runs, not one while it starts.
    wrapper.signal(Signal::USR1);
    wrapper.expect_line("got-usr1");
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", wrapper.pid()))
        .expect("the wrapper's children");
    let keeper: Vec<i32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(keeper.len(), 1, "the keeper is the wrapper's only child");
    let keeper = rustix::process::Pid::from_raw(keeper[0]).expect("pid");
    rustix::process::kill_process(keeper, Signal::KILL).expect("kill the keeper");
    assert_eq!(wrapper.exit_code(), 70, "an internal error");
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("keeper") && stderr.contains("were stopped"),
        "{stderr}"
    );
    assert!(!stderr.contains("may still be running"), "{stderr}");
    let mut next = cli(None, lock_dir.path(), &["run", &name, "--", "echo", "next"]);
    next.expect_line("next");
    assert_eq!(next.exit_code(), 0);
}

/// The wrapper and then its keeper both SIGKILLed (`kill -9 -1`, the OOM killer): COMMAND dies
/// with its keeper (`PR_SET_PDEATHSIG`) and the instance is free; or, when COMMAND changed its
/// credentials (`setpriv`), which clears that signal, COMMAND lives on and the lock it
/// inherited still holds the instance: a copy is refused until COMMAND is gone. Never a
/// COMMAND running unguarded beside a new copy (an audit: no test failed with either guard
/// removed).
#[test]
fn command_never_outlives_a_killed_wrapper_and_keeper_unguarded() {
    use std::os::unix::fs::PermissionsExt;
    let setpriv = common::require_program("setpriv", "util-linux");
    let setpriv = setpriv.to_str().expect("UTF-8 path");
    for drops_privileges in [false, true] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(lock_dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755");
        let name = unique_name("wrapper_and_keeper_killed");
        let mut args = vec!["run", "--kill-after=600", "--backend=lockfile", &name, "--"];
        if drops_privileges {
            args.extend_from_slice(&[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]);
        }
        args.extend_from_slice(&[
            "sh",
            "-c",
            "trap '' TERM; echo pid $$; exec sleep 600",
            &name,
        ]);
        let mut wrapper = cli(None, lock_dir.path(), &args);
        let (pid, pidfd) = command_pidfd(&mut wrapper);
        let _command = KillOnDrop(&pidfd);
        let keeper = the_keeper(&wrapper, &name);
        let keeper_fd = rustix::process::Pid::from_raw(keeper as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .unwrap_or_else(|| panic!("keeper {keeper} is not running"));
        wrapper.sigkill();
        wrapper.stderr_line_containing(&format!("its keeper (pid {keeper}) holds the instance"));
        rustix::process::pidfd_send_signal(&keeper_fd, Signal::KILL).expect("kill the keeper");
        wait_pidfd(keeper, &keeper_fd);
        if drops_privileges {
            assert!(
                !has_exited(&pidfd),
                "COMMAND died with its keeper after setpriv"
            );
            let mut refused = cli(
                None,
                lock_dir.path(),
                &["run", "--backend=lockfile", &name, "--", "echo", "ran"],
            );
            assert_eq!(
                refused.exit_code(),
                75,
                "a copy ran beside COMMAND (pid {pid}): {:?}",
                refused.stdout_until_closed()
            );
            rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        }
        // COMMAND dies with its keeper (or was killed above); then the instance is free.
        wait_pidfd(pid, &pidfd);
        let mut next = cli(
            None,
            lock_dir.path(),
            &["run", "--backend=lockfile", &name, "--", "echo", "next"],
        );
        next.expect_line("next");
        assert_eq!(next.exit_code(), 0);
    }
}

/// While only the keeper holds the instance — the wrapper was killed, and COMMAND (which
/// ignores SIGTERM) is being stopped — a refused copy names the keeper, the live process that
/// holds the instance, and not the dead wrapper: never "holder unknown" after the grace a
/// record gets. `status` names it too.
#[test]
fn a_refusal_names_the_keeper_once_the_wrapper_is_gone() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_named");
    let (_wrapper, pid, pidfd, keeper) = keeper_alone_holding(None, lock_dir.path(), &name, &[]);
    let _command = KillOnDrop(&pidfd);
    let mut second = cli(None, lock_dir.path(), &["run", &name, "--", "true"]);
    assert_eq!(second.exit_code(), 75);
    let refusal = second.stderr_until_closed().join("\n");
    assert!(
        refusal.contains(&format!("(pid {keeper},")) && !refusal.contains("unknown"),
        "the refusal names the keeper (pid {keeper}), which holds the instance while it stops \
         COMMAND (pid {pid}): {refusal}"
    );
    let mut status = cli(None, lock_dir.path(), &["status", "--json", &name]);
    let json = status.next_line("status --json");
    assert_eq!(status.exit_code(), 0, "{json}");
    assert!(json.contains(&format!("\"pid\":{keeper}")), "{json}");
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
    wait_pidfd(pid, &pidfd);
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "");
}

/// Once the wrapper is gone the keeper keeps the instance as the wrapper did: a lock file
/// removed while it stops COMMAND's tree (for up to --kill-after, or for as long as a descendant
/// it cannot signal lives) is re-created, locked and recorded in the keeper's name, so that a
/// copy started meanwhile is refused naming the keeper, and `status` says running (review
/// rev-cli F1: nothing re-created it, a second copy ran beside the first tree, and `status`
/// said "not running").
#[test]
fn the_keeper_re_creates_a_lock_file_removed_once_the_wrapper_is_gone() {
    use std::os::unix::fs::MetadataExt;
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_recreates");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let (mut wrapper, pid, pidfd, keeper) = keeper_alone_holding(None, lock_dir.path(), &name, &[]);
    let _command = KillOnDrop(&pidfd);
    // The keeper (which shares the wrapper's stderr) says it holds the instance alone now.
    wrapper.stderr_line_containing(&format!("its keeper (pid {keeper}) holds the instance"));
    let removed = std::fs::metadata(&path).expect("the lock file").ino();
    std::fs::remove_file(&path).expect("remove the lock file");
    // Its word that it re-created the file; a keeper that never does is shown by what follows.
    let recreated = wrapper.try_stderr_line_containing("re-created", TIMEOUT);
    let mut second = cli(
        None,
        lock_dir.path(),
        &["run", &name, "--", "echo", "SECOND COMMAND RAN"],
    );
    let stdout = second.stdout_until_closed();
    let refusal = second.stderr_until_closed().join("\n");
    assert_eq!(
        (second.exit_code(), stdout.as_slice()),
        (75, [].as_slice()),
        "a copy started while the keeper stops COMMAND (pid {pid}) is refused; the keeper's \
         word: {recreated:?}; the copy's stderr: {refusal}"
    );
    assert!(
        refusal.contains(&format!("(pid {keeper},")) && !refusal.contains("unknown"),
        "the refusal names the keeper (pid {keeper}): {refusal}"
    );
    let now = std::fs::metadata(&path).expect("re-created").ino();
    assert_ne!(now, removed, "a new file at the path");
    let mut status = cli(None, lock_dir.path(), &["status", "--json", &name]);
    let json = status.next_line("status --json");
    assert_eq!(status.exit_code(), 0, "running: {json}");
    assert!(json.contains(&format!("\"pid\":{keeper}")), "{json}");
    assert!(
        !has_exited(&pidfd),
        "COMMAND (pid {pid}) still runs, held by the keeper"
    );
    // Once COMMAND is gone the keeper exits, and the instance is free.
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
    wait_pidfd(pid, &pidfd);
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "");
}

/// A user's empty file used as the lock file (`touch keep.flag`, a shared `job.lock`) is never
/// written into nor removed, even when the wrapper is SIGKILLed and its keeper holds the file
/// alone, and should the keeper be SIGKILLed too: the next run uses it and leaves it as it was,
/// the same file with its owner and mode (reviews: the keeper's record was left in it, and the
/// next run removed it; later, a release emptied what COMMAND had written into it).
#[test]
fn a_users_empty_lock_file_survives_a_killed_wrapper() {
    use std::os::unix::fs::PermissionsExt;
    for keeper_killed in [true, false] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("keeper_keeps_flag");
        let path = lock_dir.path().join("keep.flag");
        std::fs::write(&path, b"").expect("touch keep.flag");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let before = std::fs::metadata(&path).expect("meta");
        let lock_file = format!("--lock-file={}", path.display());
        let (mut wrapper, pid, pidfd, keeper) = keeper_alone_holding(
            None,
            lock_dir.path(),
            &name,
            &["--backend=lockfile", &lock_file],
        );
        let _command = KillOnDrop(&pidfd);
        let keeper_fd = rustix::process::Pid::from_raw(keeper as i32)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .unwrap_or_else(|| panic!("keeper {keeper} is not running"));
        let _keeper = KillOnDrop(&keeper_fd);
        // The keeper (which shares the wrapper's stderr) says it holds the instance alone now.
        wrapper.stderr_line_containing(&format!("its keeper (pid {keeper}) holds the instance"));
        if keeper_killed {
            rustix::process::pidfd_send_signal(&keeper_fd, Signal::KILL).expect("kill keeper");
        }
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
        wait_pidfd(keeper, &keeper_fd);
        let left = std::fs::read(&path).expect("the file, after the keeper");
        assert!(
            left.is_empty(),
            "something of ours was written into the user's file: {:?}",
            String::from_utf8_lossy(&left)
        );
        for round in 0..2 {
            let mut next = cli(
                None,
                lock_dir.path(),
                &["run", "--backend=lockfile", &lock_file, &name, "--", "true"],
            );
            assert_eq!(
                next.exit_code(),
                0,
                "keeper killed: {keeper_killed}, round {round}"
            );
            common::assert_same_empty_file(
                &path,
                &before,
                &format!("keeper killed: {keeper_killed}, round {round}"),
            );
        }
    }
}

/// A user's empty file given as the lock file, `flock(1)` style (`run --lock-file job.log …`,
/// COMMAND appending to `job.log`), is the user's: nothing of ours is written into it, and
/// what COMMAND writes into it is still there after the release, and after a wrapper killed,
/// whose keeper keeps the lock all the same (review: the release emptied it, the log lost; and
/// the keeper, finding it not a record, let the instance go and killed COMMAND without its
/// grace). A file with data in it is then no lock file for the next copy (64), left as it is.
#[test]
fn what_command_writes_into_a_users_lock_file_is_kept() {
    use std::os::unix::fs::MetadataExt;
    for wrapper_killed in [false, true] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("flag_written");
        let path = lock_dir.path().join("job.log");
        std::fs::write(&path, b"").expect("touch job.log");
        let before = std::fs::metadata(&path).expect("meta");
        let path_arg = path.to_str().expect("UTF-8 path");
        let lock_file = format!("--lock-file={path_arg}");
        // COMMAND shows what is in the file as it starts (nothing), then logs into it.
        let script = "printf 'seen [%s]\\n' \"$(cat \"$1\")\"; echo logged >> \"$1\"; \
                      trap '' TERM; echo pid $$; exec sleep 600";
        let mut wrapper = cli(
            None,
            lock_dir.path(),
            &[
                "run",
                "--kill-after=600",
                "--backend=lockfile",
                &lock_file,
                &name,
                "--",
                "sh",
                "-c",
                script,
                &name,
                path_arg,
            ],
        );
        assert_eq!(wrapper.next_line("what COMMAND saw"), "seen []");
        let (pid, pidfd) = command_pidfd(&mut wrapper);
        let _command = KillOnDrop(&pidfd);
        let mut refused = cli(
            None,
            lock_dir.path(),
            &["run", "--backend=lockfile", &lock_file, &name, "--", "true"],
        );
        assert_eq!(
            refused.exit_code(),
            75,
            "{:?}",
            refused.stderr_until_closed()
        );
        let mut keeper_fd = None;
        if wrapper_killed {
            let keeper = the_keeper(&wrapper, &name);
            keeper_fd = Some((
                keeper,
                rustix::process::Pid::from_raw(keeper as i32)
                    .and_then(|p| {
                        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                    })
                    .unwrap_or_else(|| panic!("keeper {keeper} is not running")),
            ));
            wrapper.sigkill();
            let line = wrapper
                .stderr_line_containing_any(&["holds the instance", "cannot keep the lock file"]);
            assert!(
                line.contains(&format!("its keeper (pid {keeper}) holds the instance")),
                "{line}"
            );
            let mut still_refused = cli(
                None,
                lock_dir.path(),
                &["run", "--backend=lockfile", &lock_file, &name, "--", "true"],
            );
            assert_eq!(still_refused.exit_code(), 75);
        }
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
        match &keeper_fd {
            // The keeper, once the tree is gone, lets go: the file is as it left it.
            Some((keeper, fd)) => wait_pidfd(*keeper, fd),
            None => assert_eq!(wrapper.exit_code(), 128 + 9),
        }
        let after = std::fs::metadata(&path).expect("the user's file is still there");
        assert_eq!(
            (after.ino(), after.mode(), after.uid()),
            (before.ino(), before.mode(), before.uid()),
            "killed: {wrapper_killed}"
        );
        // A file with data in it is no lock file: refused, even by a copy that would wait.
        let mut next = cli(
            None,
            lock_dir.path(),
            &[
                "run",
                "--wait=60",
                "--backend=lockfile",
                &lock_file,
                &name,
                "--",
                "true",
            ],
        );
        assert_eq!(next.exit_code(), 64, "{:?}", next.stderr_until_closed());
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"logged\n",
            "killed: {wrapper_killed}"
        );
    }
}

/// Once the wrapper is killed, its keeper stops COMMAND with SIGTERM and the `--kill-after`
/// grace, and what COMMAND starts to clean up in that grace (a trap's child) is not sent
/// SIGTERM too: it runs to its end, as it does when the wrapper itself stops COMMAND (a review:
/// the keeper's walk every 200 ms sent every new child SIGTERM, so every clean-up was cut
/// short). The clean-up here takes a second: the keeper walks the tree several times meanwhile.
#[test]
fn a_keeper_lets_commands_clean_up_run_its_course() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_cleanup");
    let script = "cleanup() { sleep 1; echo \"clean-up rc=$?\"; exit 0; }; trap cleanup TERM; \
                  echo pid $$; sleep 600 & wait";
    let mut wrapper = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--kill-after=600",
            "--backend=lockfile",
            &name,
            "--",
            "bash",
            "-c",
            script,
            &name,
        ],
    );
    let (pid, pidfd) = command_pidfd(&mut wrapper);
    let _command = KillOnDrop(&pidfd);
    let keeper = the_keeper(&wrapper, &name);
    wrapper.sigkill();
    wrapper.stderr_line_containing(&format!("its keeper (pid {keeper}) holds the instance"));
    assert_eq!(wrapper.next_line("the clean-up's end"), "clean-up rc=0");
    wait_pidfd(pid, &pidfd);
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "");
}

/// Takes every inotify instance user `uid` may have, until its stdin closes.
fn take_every_inotify_instance(uid: u32) -> Proc {
    let perl = common::require_program("perl", "perl");
    let mut hog = std::process::Command::new(&perl);
    hog.args([
        "-e",
        "require 'syscall.ph'; $| = 1; my @fds; \
         while ((my $fd = syscall(&SYS_inotify_init1, 0)) >= 0) { push @fds, $fd } \
         print scalar(@fds), qq(\n); <STDIN>",
    ]);
    let mut hog = Proc::spawn(as_user(uid, uid, &hog));
    let taken = hog.next_line("the inotify instances taken");
    assert_ne!(taken, "0", "the hog took no inotify instance");
    hog
}

/// Without inotify (the per-user limit of instances reached), the wrapper once said nothing
/// unless RUST_LOG asked, and re-checked the lock file every 10 s: a removal let another copy
/// run beside COMMAND that long, unannounced (a review saw 8 s). It now warns on stderr
/// whatever RUST_LOG says, and a removal found by its re-check, every second, stops COMMAND as
/// a loss.
#[test]
fn without_inotify_the_wrapper_warns_and_a_removal_is_a_loss() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs copies as another user: run the suite as root (./scripts/test)"
    );
    // A user of its own (not the other inotify test's), whose inotify limit nothing else uses.
    let uid = 57000 + std::process::id() % 4000;
    let lock_dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(lock_dir.path(), Some(uid), Some(uid)).expect("chown");
    let name = unique_name("wrapper_no_inotify");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let lock_file = format!("--lock-file={}", path.display());
    let mut hog = take_every_inotify_instance(uid);
    let mut cmd = cli_command(
        None,
        lock_dir.path(),
        &[
            "run",
            "--backend=lockfile",
            &lock_file,
            &name,
            "--",
            "sh",
            "-c",
            "echo ready; read _",
        ],
    );
    // As a user runs it: no log lines asked for.
    cmd.env_remove("RUST_LOG");
    let mut wrapper = Proc::spawn(as_user(uid, uid, &cmd));
    wrapper.expect_line("ready");
    let warned = wrapper.stderr_line_containing("cannot watch");
    assert!(
        warned.contains(&path.display().to_string()) && warned.contains("every second"),
        "{warned}"
    );
    std::fs::remove_file(&path).expect("remove the lock file");
    assert_eq!(wrapper.exit_code(), 69, "the removal is a loss");
    hog.close_stdin();
    assert_eq!(hog.exit_code(), 0);
}

/// When the keeper cannot have an inotify instance (the per-user limit of 128 reached, as on a
/// busy desktop), it looks at the lock file every 200 ms instead of never. A removal it finds
/// so was not seen happen: another copy may have made the file, run and left in between, so it
/// does not re-create the file (as it used to, hiding that copy) but takes the lock for lost
/// and stops COMMAND's tree at once; a copy started then runs.
#[test]
fn without_inotify_the_keeper_takes_a_removed_lock_file_for_lost() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs copies as another user: run the suite as root (./scripts/test)"
    );
    // A user of its own, so that no other test's processes count against its inotify limit.
    let uid = 61000 + std::process::id() % 4000;
    let lock_dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(lock_dir.path(), Some(uid), Some(uid)).expect("chown");
    let name = unique_name("keeper_no_inotify");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let lock_file = format!("--lock-file={}", path.display());
    let mut hog = take_every_inotify_instance(uid);
    let run =
        |args: &[&str]| Proc::spawn(as_user(uid, uid, &cli_command(None, lock_dir.path(), args)));
    // NAME is sh's $0: it marks this case's keeper. COMMAND ends when its stdin closes.
    let mut wrapper = run(&[
        "run",
        "--backend=lockfile",
        &lock_file,
        "--kill-after=600",
        &name,
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo ready; read _",
        &name,
    ]);
    wrapper.expect_line("ready");
    let keeper = the_keeper(&wrapper, &name);
    wrapper.sigkill();
    wrapper.stderr_line_containing("it looks at it every");
    std::fs::remove_file(&path).expect("remove the lock file");
    let said = wrapper.stderr_line_containing("excludes no other copy any more");
    assert!(
        said.contains(&format!("keeper (pid {keeper})")) && said.contains("not seen"),
        "{said}"
    );
    // COMMAND's tree stopped at once (it ignores SIGTERM, and had 600 s): the keeper exits,
    // and with it the last holder of the wrapper's stderr.
    wrapper.stderr_until_closed();
    let mut second = run(&["run", &lock_file, &name, "--", "echo", "SECOND COMMAND RAN"]);
    let stdout = second.stdout_until_closed();
    let said = second.stderr_until_closed().join("\n");
    assert_eq!(
        (second.exit_code(), stdout.as_slice()),
        (0, ["SECOND COMMAND RAN".to_owned()].as_slice()),
        "nothing holds the instance any more: {said}"
    );
    hog.close_stdin();
    assert_eq!(hog.exit_code(), 0);
}

/// A `run` of `name` whose wrapper has been killed by SIGKILL, leaving its keeper alone holding
/// the instance while COMMAND (which ignores SIGTERM, and is given 600 s) is being stopped: the
/// killed wrapper (its stderr is the keeper's), COMMAND's PID and pidfd, and the keeper's PID.
/// On `bus` (none: no bus), with `options` of `run` before NAME.
fn keeper_alone_holding(
    bus: Option<&str>,
    lock_dir: &Path,
    name: &str,
    options: &[&str],
) -> (Proc, u32, rustix::fd::OwnedFd, u32) {
    let mut args = vec!["run", "--kill-after=600"];
    args.extend_from_slice(options);
    // NAME is sh's $0: it marks this case's keeper.
    args.extend_from_slice(&[
        name,
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo pid $$; exec sleep 600",
        name,
    ]);
    let mut wrapper = cli(bus, lock_dir, &args);
    let (pid, pidfd) = command_pidfd(&mut wrapper);
    let keeper = the_keeper(&wrapper, name);
    wrapper.sigkill();
    (wrapper, pid, pidfd, keeper)
}

/// Has the process of `pidfd` exited already (looked at now, without waiting)?
fn has_exited(pidfd: &rustix::fd::OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).expect("poll") == 1
}

/// Without `/proc` (a container or chroot that did not mount it), `run` can neither start
/// COMMAND's keeper (it re-executes itself through `/proc/self/exe`) nor find the processes
/// COMMAND leaves behind: it fails closed before acquiring anything, saying what is missing
/// and what to do, and COMMAND never runs.
#[test]
fn run_without_proc_says_what_is_missing() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it unmounts /proc in a mount namespace of its own)"
    );
    let unshare = common::require_program("unshare", "util-linux");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("no_proc");
    let inner = cli_command(None, lock_dir.path(), &["run", &name, "--", "echo", "ran"]);
    let mut unshare = std::process::Command::new(unshare);
    unshare
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("umount -l /proc && exec \"$0\" \"$@\"");
    let cmd = common::wrapped(unshare, &inner);
    let mut wrapper = Proc::spawn(cmd);
    assert_eq!(
        wrapper.stdout_until_closed(),
        Vec::<String>::new(),
        "COMMAND ran"
    );
    assert_eq!(wrapper.exit_code(), 70);
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("/proc is not mounted") && stderr.contains("mount -t proc proc /proc"),
        "says what is missing and what to do: {stderr}"
    );
    assert!(
        !lock_dir.path().join(format!("{name}.lock")).exists(),
        "nothing was acquired"
    );
}

/// With a `/proc` of another PID namespace (`unshare --pid --fork` without `--mount-proc`), the
/// children `/proc/PID/task/*/children` lists are that namespace's numbers: `run` once signalled
/// them here as its own leftovers, killing whatever had those numbers in its namespace (its own
/// threads among them: exit 137 after COMMAND succeeded). It now fails closed before acquiring,
/// naming the mismatch and what to do, and COMMAND never runs.
#[test]
fn run_with_another_namespaces_proc_says_so_and_starts_nothing() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes a PID namespace)"
    );
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("foreign_proc");
    let inner = cli_command(None, lock_dir.path(), &["run", &name, "--", "echo", "ran"]);
    let mut unshare = std::process::Command::new(common::require_program("unshare", "util-linux"));
    unshare.args(["--pid", "--fork", "--"]);
    let mut wrapper = Proc::spawn(common::wrapped(unshare, &inner));
    assert_eq!(
        wrapper.stdout_until_closed(),
        Vec::<String>::new(),
        "COMMAND ran"
    );
    assert_eq!(wrapper.exit_code(), 70);
    let stderr = wrapper.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("/proc is another PID namespace's") && stderr.contains("--mount-proc"),
        "says what is wrong and what to do: {stderr}"
    );
    assert!(
        !lock_dir.path().join(format!("{name}.lock")).exists(),
        "nothing was acquired"
    );
}

/// Once the wrapper is killed, the bus name stays owned by its connection, which the keeper
/// holds: the bus still gives the wrapper's PID (the connection's maker) for it. Neither a
/// refusal nor `status` may name that dead process. With the lock file, the keeper's record
/// keeps the connection's unique name: both name the keeper, one holder of both (not "holders
/// differ"). With the bus alone, the holder is unknown.
#[test]
fn the_dead_wrapper_is_never_named_as_the_bus_names_owner() {
    let bus = DbusDaemon::start(BusConfig::Open);
    for backend in ["auto", "dbus"] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("dead_wrapper");
        let (mut wrapper, pid, pidfd, keeper) = keeper_alone_holding(
            Some(&bus.address),
            lock_dir.path(),
            &name,
            &["--backend", backend],
        );
        let _command = KillOnDrop(&pidfd);
        let dead = wrapper.pid();
        // Said once the keeper has named itself in the record.
        wrapper.stderr_line_containing("holds the instance while it stops");
        let mut second = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["run", "--backend", backend, &name, "--", "true"],
        );
        assert_eq!(second.exit_code(), 75, "{backend}");
        let refusal = second.stderr_until_closed().join("\n");
        let named = if backend == "dbus" {
            "holder unknown".to_owned()
        } else {
            format!("(pid {keeper},")
        };
        assert!(
            refusal.contains(&named) && !refusal.contains(&format!("pid {dead},")),
            "{backend}: the refusal must say {named:?}, never the dead wrapper (pid {dead}); \
             the keeper is {keeper}: {refusal}"
        );
        let mut status = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["status", "--backend", backend, "--json", &name],
        );
        let json = status.next_line("status --json");
        assert_eq!(status.exit_code(), 0, "{backend}: {json}");
        let object: serde_json::Value = serde_json::from_str(&json).expect("status --json");
        let expected = if backend == "dbus" {
            serde_json::Value::Null
        } else {
            serde_json::Value::from(keeper)
        };
        assert_eq!(object["pid"], expected, "{backend}: {json}");
        // The bus alone cannot tie its answer to the keeper: its PID is not known.
        assert_eq!(
            object["bus_owner"]["pid"],
            serde_json::Value::Null,
            "{backend}: {json}"
        );
        assert_eq!(object["holders_differ"], false, "{backend}: {json}");
        let mut text = cli(
            Some(&bus.address),
            lock_dir.path(),
            &["status", "--backend", backend, &name],
        );
        let said = text.stdout_until_closed().join("\n");
        assert_eq!(text.exit_code(), 0, "{backend}: {said}");
        assert!(
            said.contains(&named.replace('(', "")) && !said.contains(&format!("pid {dead},")),
            "{backend}: {said}"
        );
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
    }
}

/// Once the instance is free, a copy that waits for it runs its COMMAND and exits 0; `what`
/// says which case failed.
fn assert_a_waiting_copy_runs(bus: Option<&str>, lock_dir: &Path, name: &str, what: &str) {
    let mut next = cli(
        bus,
        lock_dir,
        &["run", "--wait=30", name, "--", "echo", "third"],
    );
    assert_eq!(
        next.next_line("the waiting copy's COMMAND"),
        "third",
        "{what}"
    );
    assert_eq!(next.exit_code(), 0, "{what}");
}

/// A wrapper stopped (SIGSTOP) while its lock file is moved away, another copy comes and goes
/// (it makes its own file at the path, runs, and removes it), and the file is moved back, then
/// killed: the events its watch never read are not forgotten by its keeper, which reads them
/// from the wrapper's own inotify instance (handed over with `go`), reports the loss and stops
/// the tree at once (review: the keeper watched afresh, found the path leading to its file, and
/// held on while COMMAND ran beside another copy, with nothing ever saying so).
#[test]
fn review_a_loss_the_wrapper_never_read_is_not_forgotten_by_its_keeper() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_unread");
    let (mut wrapper, pid, pidfd, keeper) = stopped_wrapper(lock_dir.path(), &name);
    let _command = KillOnDrop(&pidfd);
    let path = lock_dir.path().join(format!("{name}.lock"));
    let away = lock_dir.path().join("moved-away");
    std::fs::rename(&path, &away).expect("move the lock file away");
    common::another_copy_comes_and_goes(lock_dir.path(), &name, &[]);
    std::fs::rename(&away, &path).expect("and back");
    wrapper.sigkill();
    let said =
        wrapper.stderr_line_containing_any(&["holds the instance while", "excludes no other copy"]);
    assert!(
        said.contains("excludes no other copy"),
        "another copy ran beside COMMAND (pid {pid}) while the wrapper was stopped; the keeper \
         (pid {keeper}) says: {said}"
    );
    // Nothing holds the instance any more: the tree is killed at once (SIGKILL).
    wait_pidfd(pid, &pidfd);
}

/// A wrapper stopped while its lock file, or the lock directory, is moved away (and a new empty
/// directory made in the directory's place), then killed: the path no longer leads to the file
/// the keeper holds, so it cannot keep it. It used to hold it on "unwatched", saying it held the
/// instance while a copy started then ran beside COMMAND for the whole `--kill-after` (a
/// review). It is let go now, said so, and the tree is killed at once.
#[test]
fn a_lock_file_moved_away_while_the_wrapper_was_stopped_is_let_go_by_its_keeper() {
    for moved in ["the file", "the directory"] {
        let base = tempfile::tempdir().expect("tempdir");
        let lock_dir = base.path().join("locks");
        std::fs::create_dir(&lock_dir).expect("mkdir");
        let name = unique_name("keeper_moved");
        let (mut wrapper, pid, pidfd, keeper) = stopped_wrapper(&lock_dir, &name);
        let _command = KillOnDrop(&pidfd);
        if moved == "the file" {
            let path = lock_dir.join(format!("{name}.lock"));
            std::fs::rename(&path, lock_dir.join("moved-away")).expect("mv the file");
        } else {
            std::fs::rename(&lock_dir, base.path().join("locks-away")).expect("mv the directory");
            std::fs::create_dir(&lock_dir).expect("mkdir in its place");
        }
        wrapper.sigkill();
        let said = wrapper
            .stderr_line_containing_any(&["holds the instance while", "excludes no other copy"]);
        assert!(
            said.contains("excludes no other copy"),
            "{moved}: the keeper (pid {keeper}) held on to a lock file the path no longer leads \
             to, while COMMAND (pid {pid}) ran on: {said}"
        );
        wait_pidfd(pid, &pidfd);
    }
}

/// The control of the test above: a wrapper stopped, then killed, with nothing done at the path
/// meanwhile (or only a file of another name made and removed beside it), leaves its keeper
/// holding the instance while it stops COMMAND: no loss is reported, and a copy started then
/// is refused.
#[test]
fn a_keeper_of_a_stopped_then_killed_wrapper_holds_on_when_nothing_happened() {
    for unrelated in [false, true] {
        let lock_dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("keeper_quiet");
        let (mut wrapper, pid, pidfd, keeper) = stopped_wrapper(lock_dir.path(), &name);
        let _command = KillOnDrop(&pidfd);
        if unrelated {
            let other = lock_dir.path().join(format!("{name}.other"));
            std::fs::write(&other, b"").expect("a file beside the lock file");
            std::fs::remove_file(&other).expect("and gone");
        }
        wrapper.sigkill();
        assert_keeper_holds_on(&mut wrapper, lock_dir.path(), &name, keeper, pid, unrelated);
        rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
        wait_pidfd(pid, &pidfd);
        assert_a_waiting_copy_runs(None, lock_dir.path(), &name, &format!("{unrelated}"));
    }
}

/// A wrapper killed while it runs normally, after it re-created its lock file (someone removed
/// it) and handed the new file to its keeper: the events it read are not read again by the
/// keeper, and its own re-creation is no loss there.
#[test]
fn a_keeper_of_a_wrapper_killed_after_a_re_creation_it_handed_over_holds_on() {
    use std::os::unix::fs::MetadataExt;
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_after_recreation");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let mut wrapper = keeper_test_wrapper(lock_dir.path(), &name);
    let (pid, pidfd) = command_pidfd(&mut wrapper);
    let _command = KillOnDrop(&pidfd);
    let keeper = the_keeper(&wrapper, &name);
    common::wait_until_watching(wrapper.pid());
    std::fs::remove_file(&path).expect("remove the lock file");
    wrapper.stderr_line_containing("re-created");
    let new = std::fs::metadata(&path).expect("re-created");
    assert!(
        holds_file(keeper, new.dev(), new.ino()),
        "the keeper got the new file"
    );
    common::wait_until_events_read(wrapper.pid());
    wrapper.sigkill();
    assert_keeper_holds_on(&mut wrapper, lock_dir.path(), &name, keeper, pid, true);
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
    wait_pidfd(pid, &pidfd);
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "");
}

/// A wrapper stopped while its lock file is removed (only that), then killed: the removal its
/// watch never read was seen all the same (the keeper reads the wrapper's inotify instance),
/// so the keeper re-creates the file, as the wrapper would have, and still excludes.
#[test]
fn a_removal_the_wrapper_never_read_is_re_created_by_its_keeper() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("keeper_unread_removal");
    let (mut wrapper, pid, pidfd, keeper) = stopped_wrapper(lock_dir.path(), &name);
    let _command = KillOnDrop(&pidfd);
    let path = lock_dir.path().join(format!("{name}.lock"));
    std::fs::remove_file(&path).expect("remove the lock file");
    wrapper.sigkill();
    let said = wrapper.stderr_line_containing_any(&["re-created", "excludes no other copy"]);
    assert!(
        said.contains("re-created"),
        "the keeper (pid {keeper}) saw the removal in the wrapper's events: {said}"
    );
    assert_keeper_holds_on(&mut wrapper, lock_dir.path(), &name, keeper, pid, true);
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).expect("kill COMMAND");
    wait_pidfd(pid, &pidfd);
    assert_a_waiting_copy_runs(None, lock_dir.path(), &name, "");
}

/// `run --backend lockfile --kill-after=600 NAME -- COMMAND`, COMMAND a shell that ignores
/// SIGTERM, says its PID and sleeps (NAME, its `$0`, marks this case's keeper).
fn keeper_test_wrapper(lock_dir: &Path, name: &str) -> Proc {
    cli(
        None,
        lock_dir,
        &[
            "run",
            "--backend",
            "lockfile",
            "--kill-after=600",
            name,
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo pid $$; exec sleep 600",
            name,
        ],
    )
}

/// [`keeper_test_wrapper`] once its watch is in place, stopped (SIGSTOP): the wrapper,
/// COMMAND's PID and pidfd, and the keeper's PID.
fn stopped_wrapper(lock_dir: &Path, name: &str) -> (Proc, u32, rustix::fd::OwnedFd, u32) {
    let mut wrapper = keeper_test_wrapper(lock_dir, name);
    let (pid, pidfd) = command_pidfd(&mut wrapper);
    let keeper = the_keeper(&wrapper, name);
    common::wait_until_watching(wrapper.pid());
    wrapper.stop();
    (wrapper, pid, pidfd, keeper)
}

/// The wrapper is gone: its keeper says it holds the instance while it stops COMMAND (`pid`),
/// says no loss (now, nor a moment later), and a copy started then is refused naming it.
fn assert_keeper_holds_on(
    wrapper: &mut Proc,
    lock_dir: &Path,
    name: &str,
    keeper: u32,
    pid: u32,
    what: impl std::fmt::Debug,
) {
    let said =
        wrapper.stderr_line_containing_any(&["holds the instance while", "excludes no other copy"]);
    assert!(
        said.contains(&format!("its keeper (pid {keeper}) holds the instance")),
        "{what:?}: nothing happened that another copy could use; the keeper says: {said}"
    );
    let mut second = cli(None, lock_dir, &["run", name, "--", "echo", "SECOND RAN"]);
    let stdout = second.stdout_until_closed();
    let refusal = second.stderr_until_closed().join("\n");
    assert_eq!(
        (second.exit_code(), stdout.as_slice()),
        (75, [].as_slice()),
        "{what:?}: a copy started while the keeper stops COMMAND (pid {pid}) is refused: \
         {refusal}"
    );
    assert!(
        refusal.contains(&format!("(pid {keeper},")),
        "{what:?}: {refusal}"
    );
    let later =
        wrapper.try_stderr_line_containing("excludes no other copy", Duration::from_millis(500));
    assert_eq!(later, None, "{what:?}: no loss");
}
