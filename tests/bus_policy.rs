//! The generated system-bus policy on a bus configured like a distribution's system bus
//! (`deny own="*"`, method calls denied by default): the service's user owns the name, anyone
//! else (root included) is refused and told it is the policy, and callers are who it says.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    DbusDaemon, NOBODY, Proc, as_user, clean_command, example_path, require_program, unique_name,
};

/// The service user of these tests: `daemon` (uid 1) exists on every Debian system.
const SERVICE_UID: u32 = 1;
const SERVICE_USER: &str = "daemon";

/// Generates the deployment of the example server for `name` and returns its policy file.
fn generated_policy(out: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let exec = example_path("server");
    let mut cmd = Command::new(common::cli_path());
    cmd.arg("generate")
        .arg("--out-dir")
        .arg(out)
        .arg("--exec")
        .arg(&exec)
        .args(["--user", SERVICE_USER])
        .args(extra)
        .arg(name);
    let mut generate = Proc::spawn(cmd);
    assert_eq!(generate.exit_code(), 0, "{:?}", generate.stderr_lines());
    out.join("dbus").join(format!("{name}.conf"))
}

/// A lock directory shaped like /run/lock/unique-instance, shared by all the users here.
fn shared_lock_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    dir
}

/// `cmd` on the system-like bus, with the shared lock directory, as `uid` (0: as root).
fn on_system_bus(mut cmd: Command, bus: &DbusDaemon, uid: u32) -> Proc {
    cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    if uid == 0 {
        Proc::spawn(cmd)
    } else {
        Proc::spawn(as_user(uid, uid, &cmd))
    }
}

fn run_cli(bus: &DbusDaemon, lock_dir: &Path, uid: u32, name: &str) -> Proc {
    let mut cmd = clean_command(&common::cli_path(), None, lock_dir);
    cmd.args(["run", "--system", name, "--", "echo", "ran"]);
    on_system_bus(cmd, bus, uid)
}

fn example_server(bus: &DbusDaemon, lock_dir: &Path, uid: u32, name: &str) -> Proc {
    // As its unit runs it: system scope from the environment.
    let mut cmd = clean_command(&example_path("server"), None, lock_dir);
    cmd.arg(name).env("UNIQUE_INSTANCE_SCOPE", "system");
    on_system_bus(cmd, bus, uid)
}

/// `busctl call` on the bus as `uid`: (exit code, stdout, stderr).
fn busctl(bus: &DbusDaemon, uid: u32, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(require_program("busctl", "systemd"));
    cmd.arg(format!("--address={}", bus.address))
        .arg("--timeout=10")
        .arg("call")
        .args(args);
    let mut call = if uid == 0 {
        Proc::spawn(cmd)
    } else {
        Proc::spawn(as_user(uid, uid, &cmd))
    };
    let code = call.exit_code();
    (
        code,
        call.stdout_until_closed().join("\n"),
        call.stderr_until_closed().join("\n"),
    )
}

fn owner_pid(bus: &DbusDaemon, name: &str) -> String {
    let (code, out, err) = busctl(
        bus,
        0,
        &[
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
            "s",
            name,
        ],
    );
    assert_eq!(code, 0, "{err}");
    out.trim().strip_prefix("u ").expect("u PID").to_owned()
}

fn assert_refused_by_policy(mut attempt: Proc, who: &str) {
    assert_eq!(attempt.exit_code(), 77, "{who}: exit status");
    assert_eq!(
        attempt.stdout_until_closed(),
        Vec::<String>::new(),
        "{who}: COMMAND ran"
    );
    let stderr = attempt.stderr_until_closed().join("\n");
    assert!(
        stderr.contains("not permitted") && stderr.contains("bus policy"),
        "{who}: {stderr}"
    );
    assert!(!stderr.contains("already running"), "{who}: {stderr}");
}

#[test]
fn only_the_service_user_owns_the_name_and_anyone_else_is_told_it_is_the_policy() {
    let generated = tempfile::tempdir().expect("tempdir");
    let name = unique_name("policy_owner");
    let policy = generated_policy(generated.path(), &name, &[]);
    let bus = DbusDaemon::start_system_like(&policy);
    let lock_dir = shared_lock_dir();

    // While nothing runs: another user, and root too, are refused by the bus.
    assert_refused_by_policy(run_cli(&bus, lock_dir.path(), NOBODY, &name), "nobody");
    assert_refused_by_policy(run_cli(&bus, lock_dir.path(), 0, &name), "root");

    // The service's user owns it.
    let mut service = example_server(&bus, lock_dir.path(), SERVICE_UID, &name);
    let ready = service.line_starting("ready:");
    let service_pid = service.pid().to_string();
    assert!(ready.ends_with(&service_pid), "{ready}");
    assert_eq!(owner_pid(&bus, &name), service_pid);

    // Every local user may call it (--callers everyone, the default).
    let (code, out, err) = busctl(
        &bus,
        NOBODY,
        &[&name, "/org/example/Server", "org.example.Server1", "Pid"],
    );
    assert_eq!(code, 0, "nobody's call: {err}");
    assert_eq!(out.trim(), format!("u {service_pid}"));

    // Now that it runs, the others are told that, with its PID: the service user's own second
    // copy, and another user, who may only read its lock file.
    for (uid, who) in [(SERVICE_UID, "service user"), (NOBODY, "nobody")] {
        let mut second = run_cli(&bus, lock_dir.path(), uid, &name);
        assert_eq!(second.exit_code(), 75, "{who}");
        let stderr = second.stderr_until_closed().join("\n");
        assert!(
            stderr.contains("already running") && stderr.contains(&format!("pid {service_pid}")),
            "{who}: {stderr}"
        );
    }
    service.signal(rustix::process::Signal::TERM);
    assert_eq!(service.exit_code(), 0);
}

#[test]
fn callers_root_keeps_other_users_from_calling() {
    let generated = tempfile::tempdir().expect("tempdir");
    let name = unique_name("policy_callers");
    let policy = generated_policy(generated.path(), &name, &["--callers", "root"]);
    let bus = DbusDaemon::start_system_like(&policy);
    let lock_dir = shared_lock_dir();
    let mut service = example_server(&bus, lock_dir.path(), SERVICE_UID, &name);
    service.line_starting("ready:");
    let call = [
        &name as &str,
        "/org/example/Server",
        "org.example.Server1",
        "Ping",
    ];
    let (code, _, err) = busctl(&bus, NOBODY, &call);
    assert_ne!(code, 0, "nobody may not call it");
    assert!(
        err.contains("Access denied") || err.contains("AccessDenied"),
        "{err}"
    );
    let (code, out, err) = busctl(&bus, 0, &call);
    assert_eq!(code, 0, "root may: {err}");
    assert_eq!(out.trim(), format!("s \"pong from {name}\""));
    service.signal(rustix::process::Signal::TERM);
    assert_eq!(service.exit_code(), 0);
}
