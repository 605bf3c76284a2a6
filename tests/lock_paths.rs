//! Where the lock file is, and which explicit paths are refused: the same identity always meets
//! at the same lock file, whatever its environment says. These tests use the *default* lock
//! directories (no `UNIQUE_INSTANCE_LOCK_DIR`), with names of their own.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{NOBODY, Proc, as_user, example_path, field, unique_name};
use unique_instance::{Backend, Error, InstanceOptions, Scope};

/// The `holder` example with exactly this environment (plus PATH and RUST_LOG): unlike
/// `common::holder`, no lock directory is imposed.
fn bare_holder(env: &[(&str, &OsStr)], args: &[&str]) -> Command {
    let mut cmd = Command::new(example_path("holder"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// A directory owned by `uid`, mode 0700, standing for that user's `XDG_RUNTIME_DIR`.
fn runtime_dir_of(uid: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).expect("chown");
    dir
}

fn expect_refused(mut copy: Proc, holder_pid: u32, what: &str) {
    let line = copy.line_starting("");
    assert!(
        line.starts_with("already-running"),
        "{what}: a second copy of the same user did not meet the first: {line}; stderr: {:?}",
        copy.stderr_lines()
    );
    assert_eq!(
        field(&line, "holder_pid"),
        Some(holder_pid.to_string().as_str()),
        "{what}: {line}"
    );
    assert_eq!(copy.exit_code(), 75, "{what}");
}

#[test]
fn one_user_meets_at_one_lock_file_whatever_xdg_runtime_dir_says() {
    // As another user (Auto resolves to the user scope) and as root in the user scope.
    for (uid, scope) in [(NOBODY, "auto"), (0, "user")] {
        let name = unique_name("same_user");
        let runtime = runtime_dir_of(uid);
        let other_runtime = runtime_dir_of(uid);
        let args = [name.as_str(), "--scope", scope, "--backend", "lockfile"];
        let spawn = |env: &[(&str, &OsStr)]| {
            let cmd = bare_holder(env, &args);
            Proc::spawn(if uid == 0 {
                cmd
            } else {
                as_user(uid, uid, &cmd)
            })
        };
        // The first copy is started from a "login session".
        let mut first = spawn(&[("XDG_RUNTIME_DIR", runtime.path().as_os_str())]);
        let acquired = first.line_starting("acquired");
        let pid: u32 = field(&acquired, "pid")
            .and_then(|p| p.parse().ok())
            .expect("pid");
        // cron, ssh, `sudo -u`: no XDG_RUNTIME_DIR at all.
        expect_refused(spawn(&[]), pid, "XDG_RUNTIME_DIR unset");
        // Another session's (or a stale) runtime directory.
        expect_refused(
            spawn(&[("XDG_RUNTIME_DIR", other_runtime.path().as_os_str())]),
            pid,
            "another XDG_RUNTIME_DIR",
        );
        // Nonsense in it.
        expect_refused(
            spawn(&[("XDG_RUNTIME_DIR", OsStr::new("relative/dir"))]),
            pid,
            "a relative XDG_RUNTIME_DIR",
        );
        // And the lock file is in neither runtime directory.
        assert_eq!(
            std::fs::read_dir(runtime.path()).expect("read_dir").count(),
            0,
            "the lock file went into XDG_RUNTIME_DIR"
        );
        first.close_stdin();
        assert_eq!(first.line_starting("released"), "released");
        assert_eq!(first.exit_code(), 0);
    }
}

#[test]
fn the_user_scope_directory_comes_from_the_uid_and_is_private() {
    let name = unique_name("user_dir");
    let plan = InstanceOptions::new(&name)
        .scope(Scope::User)
        .backend(Backend::LockFile)
        .plan()
        .expect("plan");
    let uid = rustix::process::geteuid().as_raw();
    let file = plan.lock_file.expect("a lock file");
    let dir = file.parent().expect("dir").to_owned();
    // /run/lock on Debian and Ubuntu (root's, sticky, writable by all); else /tmp.
    let run_lock_fit = std::fs::symlink_metadata("/run/lock").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.is_dir() && m.uid() == 0 && m.mode() & 0o1002 == 0o1002
    });
    let base = if run_lock_fit { "/run/lock" } else { "/tmp" };
    assert_eq!(dir, Path::new(base).join(format!("unique-instance-{uid}")));
    // Taking it makes (or finds) the directory ours and 0700.
    let guard = InstanceOptions::new(&name)
        .scope(Scope::User)
        .backend(Backend::LockFile)
        .acquire()
        .expect("acquire");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&dir).expect("meta");
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (uid, 0o700));
    assert_eq!(guard.lock_file(), Some(file.as_path()));
    guard.release().expect("release");
    assert!(!file.exists());
}

fn invalid_option(
    result: unique_instance::Result<unique_instance::Plan>,
) -> (&'static str, PathBuf) {
    match result {
        Err(e @ Error::InvalidOption { .. }) => {
            assert_eq!(e.exit_code(), 64, "{e}");
            let Error::InvalidOption { option, value, .. } = e else {
                unreachable!()
            };
            (option, value)
        }
        other => panic!("expected an invalid option error, got {other:?}"),
    }
}

#[test]
fn relative_overrides_and_paths_naming_no_file_are_refused() {
    let name = unique_name("relative");
    let opts = || InstanceOptions::new(&name).backend(Backend::LockFile);
    assert_eq!(
        invalid_option(opts().lock_dir("locks").plan()),
        ("lock_dir", PathBuf::from("locks"))
    );
    assert_eq!(
        invalid_option(opts().lock_dir("./locks").plan()),
        ("lock_dir", PathBuf::from("./locks"))
    );
    assert_eq!(
        invalid_option(opts().lock_file("data.lock").plan()),
        ("lock_file", PathBuf::from("data.lock"))
    );
    for no_file in ["/", "/tmp/", "/tmp/.", "/tmp/..", "/tmp/x/"] {
        assert_eq!(
            invalid_option(opts().lock_file(no_file).plan()),
            ("lock_file", PathBuf::from(no_file)),
            "{no_file}"
        );
    }
    // Absolute ones are fine, and are planned exactly.
    let plan = opts()
        .lock_file("/srv/data/server.pid")
        .plan()
        .expect("plan");
    assert_eq!(plan.lock_file, Some(PathBuf::from("/srv/data/server.pid")));

    // The environment variable, in a real process (it must not be set in this one), and the
    // CLI's --lock-file: both exit 64 and say why, touching nothing.
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut copy = Proc::spawn({
        let mut cmd = bare_holder(
            &[("UNIQUE_INSTANCE_LOCK_DIR", OsStr::new("locks"))],
            &[&name, "--backend", "lockfile"],
        );
        cmd.current_dir(cwd.path());
        cmd
    });
    let line = copy.line_starting("");
    assert!(line.starts_with("invalid-option"), "{line}");
    assert!(line.contains("UNIQUE_INSTANCE_LOCK_DIR"), "{line}");
    assert!(line.contains("absolute"), "{line}");
    assert_eq!(copy.exit_code(), 64);
    let mut cmd = Command::new(common::cli_path());
    cmd.args(["run", "--lock-file", "data.lock", &name, "--", "true"])
        .current_dir(cwd.path());
    let output = common::output_within_timeout(&mut cmd);
    assert_eq!(
        output.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("relative"));
    assert_eq!(std::fs::read_dir(cwd.path()).expect("read_dir").count(), 0);
    // A lock file in a directory that does not exist: the caller's to fix (64, saying what to
    // do), not an internal error (70).
    let missing = cwd.path().join("no-such-dir/data.lock");
    let output = common::output_within_timeout(
        Command::new(common::cli_path())
            .args(["run", "--backend", "lockfile", "--lock-file"])
            .arg(&missing)
            .args([name.as_str(), "--", "true"]),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains("create it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(cwd.path()).expect("read_dir").count(), 0);
}

#[test]
fn a_non_utf8_lock_file_is_locked_under_its_own_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_name = OsString::from_vec(b"data-\xff\xfe.lock".to_vec());
    let path = dir.path().join(&file_name);
    let name = unique_name("non_utf8");
    let guard = InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&path)
        .acquire()
        .expect("acquire");
    assert_eq!(guard.lock_file(), Some(path.as_path()));
    let names: Vec<OsString> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![file_name.clone()], "not the byte-exact name");
    // Another copy meets it there.
    match InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&path)
        .acquire()
    {
        Err(Error::AlreadyRunning { holder, .. }) => {
            assert_eq!(holder.pid, Some(std::process::id()))
        }
        other => panic!("expected already running, got {other:?}"),
    }
    guard.release().expect("release");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0);
}

#[test]
fn a_non_utf8_scope_variable_is_an_error_not_unset() {
    let name = unique_name("scope_bytes");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let value = OsString::from_vec(b"system\xff".to_vec());
    let mut copy = Proc::spawn(bare_holder(
        &[
            ("UNIQUE_INSTANCE_SCOPE", value.as_os_str()),
            ("UNIQUE_INSTANCE_LOCK_DIR", lock_dir.path().as_os_str()),
        ],
        &[&name, "--backend", "lockfile"],
    ));
    let line = copy.line_starting("");
    assert!(line.starts_with("invalid-environment"), "{line}");
    assert!(line.contains("UNIQUE_INSTANCE_SCOPE"), "{line}");
    assert_eq!(copy.exit_code(), 64);
    assert_eq!(
        std::fs::read_dir(lock_dir.path())
            .expect("read_dir")
            .count(),
        0
    );
}

#[test]
fn errors_about_an_explicit_lock_file_name_the_instance() {
    // A directory another user may not write: creating the lock file there is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let name = unique_name("names_instance");
    let lock_file = dir.path().join("data.db.lock");
    let cmd = bare_holder(
        &[],
        &[
            &name,
            "--backend",
            "lockfile",
            "--lock-file",
            lock_file.to_str().expect("utf-8"),
        ],
    );
    let mut copy = Proc::spawn(as_user(NOBODY, NOBODY, &cmd));
    let line = copy.line_starting("");
    assert!(line.starts_with("not-permitted"), "{line}");
    assert!(
        line.contains(&format!("msg={name}: not permitted")),
        "the error does not name the instance: {line}"
    );
    assert_eq!(copy.exit_code(), 77);
}

/// `/run/unique-instance/NAME`, made for one test as `generate`'s tmpfiles line would make it,
/// removed (with whatever is left in it) when dropped.
struct ServiceDir(PathBuf);

impl ServiceDir {
    fn new(name: &str, owner: u32) -> Self {
        use std::os::unix::fs::MetadataExt;
        let base = Path::new("/run/unique-instance");
        match std::fs::create_dir(base) {
            Ok(()) => std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
                .expect("chmod"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!(
                "cannot create {}: {e} (these tests run as root)",
                base.display()
            ),
        }
        let meta = std::fs::symlink_metadata(base).expect("meta");
        assert!(
            meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o022 == 0,
            "{} is not root's and private: {meta:?}",
            base.display()
        );
        let dir = base.join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).expect("chown");
        ServiceDir(dir)
    }
}

impl Drop for ServiceDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn system_holder(uid: u32, name: &str) -> Proc {
    let cmd = bare_holder(&[], &[name, "--scope", "system", "--backend", "lockfile"]);
    Proc::spawn(if uid == 0 {
        cmd
    } else {
        as_user(uid, uid, &cmd)
    })
}

fn acquired_pid(copy: &mut Proc) -> u32 {
    let line = copy.line_starting("");
    assert!(
        line.starts_with("acquired"),
        "{line}; stderr: {:?}",
        copy.stderr_lines()
    );
    field(&line, "pid")
        .and_then(|p| p.parse().ok())
        .expect("pid")
}

fn release(mut copy: Proc) {
    copy.close_stdin();
    assert_eq!(copy.line_starting("released"), "released");
    assert_eq!(copy.exit_code(), 0);
}

#[test]
fn a_deployed_service_gets_its_own_lock_directory_that_no_one_else_can_squat() {
    use std::os::unix::fs::MetadataExt;
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    const SERVICE: u32 = NOBODY;
    const OTHER: u32 = 4_000_123;
    let name = unique_name("service_dir");
    let dir = ServiceDir::new(&name, SERVICE);
    let lock_file = dir.0.join(format!("{name}.lock"));
    let plan = InstanceOptions::new(&name)
        .scope(Scope::System)
        .backend(Backend::LockFile)
        .plan()
        .expect("plan");
    assert_eq!(plan.lock_file.as_deref(), Some(lock_file.as_path()));

    // Root's copy started by hand: the service's user and anyone else are told it runs.
    let mut root = system_holder(0, &name);
    let root_pid = acquired_pid(&mut root);
    // Given to the service's user, so the service can take it even if root's copy crashed.
    assert_eq!(std::fs::metadata(&lock_file).expect("meta").uid(), SERVICE);
    expect_refused(
        system_holder(SERVICE, &name),
        root_pid,
        "the service's user",
    );
    expect_refused(system_holder(OTHER, &name), root_pid, "another user");
    release(root);
    assert!(!lock_file.exists());

    // The service runs: root's hand-started copy and another user meet it.
    let mut service = system_holder(SERVICE, &name);
    let service_pid = acquired_pid(&mut service);
    assert_eq!(std::fs::metadata(&lock_file).expect("meta").uid(), SERVICE);
    expect_refused(system_holder(0, &name), service_pid, "root");
    expect_refused(system_holder(OTHER, &name), service_pid, "another user");
    release(service);

    // Nobody runs: another user cannot take (squat) it, and says why.
    let mut squatter = system_holder(OTHER, &name);
    let line = squatter.line_starting("");
    assert!(line.starts_with("not-permitted"), "{line}");
    assert_eq!(squatter.exit_code(), 77);
    assert!(!lock_file.exists());
    // Without the directory, the shared one as before.
    drop(dir);
    let plan = InstanceOptions::new(&name)
        .scope(Scope::System)
        .backend(Backend::LockFile)
        .plan()
        .expect("plan");
    assert_eq!(
        plan.lock_file,
        Some(Path::new("/run/lock/unique-instance").join(format!("{name}.lock")))
    );
}

/// The early copy in the shared directory, stopped while its file is removed: the service
/// starts meanwhile (the shared path is empty, so it sees no one there). Once the early copy runs
/// again it must not re-create its file and carry on beside the service: it re-creates it, sees
/// the service's copy held in the other directory, and reports the loss (a review: it re-created
/// its file without looking, said nothing, and both ran).
#[test]
fn a_copy_that_recreates_its_file_looks_at_the_other_directory_again() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    const SERVICE: u32 = NOBODY;
    let name = unique_name("recreate_other_dir");
    let shared = Path::new("/run/lock/unique-instance").join(format!("{name}.lock"));
    let mut early = system_holder(0, &name);
    acquired_pid(&mut early);
    let _dir = ServiceDir::new(&name, SERVICE);
    common::wait_until_watching(early.pid());
    early.stop();
    std::fs::remove_file(&shared).expect("remove the early copy's file");
    let mut service = system_holder(SERVICE, &name);
    acquired_pid(&mut service);
    early.signal(rustix::process::Signal::CONT);
    let lost = early.line_starting("lost");
    assert_eq!(field(&lost, "still_exclusive"), Some("false"), "{lost}");
    early.close_stdin();
    early.stdout_until_closed();
    release(service);
}

/// A service copy that waits for the shared directory's copy holds its own file unwatched
/// meanwhile. Its file removed then, a second service copy makes a new one and waits too: once
/// the shared copy leaves, only one of them may run (a review: both ran, the first told of its
/// loss only once its command had started). `--critical` catches two at once.
#[test]
fn a_file_lost_while_waiting_for_the_other_directory_is_taken_again() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    const SERVICE: u32 = NOBODY;
    let name = unique_name("lost_waiting_other_dir");
    let critical_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(critical_dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let critical = critical_dir.path().join("critical");
    let critical = critical.to_str().expect("UTF-8");
    let mut early = system_holder(0, &name);
    acquired_pid(&mut early);
    let dir = ServiceDir::new(&name, SERVICE);
    let waiter = || {
        let mut cmd = bare_holder(
            &[],
            &[
                &name,
                "--scope",
                "system",
                "--backend",
                "lockfile",
                "--wait",
                "forever",
                "--critical",
                critical,
            ],
        );
        cmd.env("RUST_LOG", "unique_instance=info");
        let mut copy = Proc::spawn(as_user(SERVICE, SERVICE, &cmd));
        copy.stderr_line_containing("waiting for the copy in the other system lock directory");
        copy
    };
    let first = waiter();
    std::fs::remove_file(dir.0.join(format!("{name}.lock"))).expect("remove the waiter's file");
    let second = waiter();
    release(early);
    // One runs; the other waits for it, and runs once it left.
    let mut copies = [first, second];
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let winner = loop {
        if let Some(i) = (0..2).find(|&i| {
            copies[i]
                .try_line(std::time::Duration::from_millis(10))
                .is_some_and(|line| {
                    assert!(line.starts_with("acquired"), "copy {i}: {line}");
                    true
                })
        }) {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "neither copy ran");
    };
    let [a, b] = copies;
    let (winner, mut other) = if winner == 0 { (a, b) } else { (b, a) };
    release(winner);
    acquired_pid(&mut other);
    release(other);
}

/// A copy started before the deployment made the service's own directory locked the shared
/// directory's file; the service, and copies started after the deployment, must still meet it
/// (they plan the service's directory). A local user's file there must not block the service.
#[test]
fn a_copy_from_before_the_deployment_still_excludes_the_service() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    const SERVICE: u32 = NOBODY;
    const OTHER: u32 = 4_000_124;
    let name = unique_name("before_deploy");
    let shared = Path::new("/run/lock/unique-instance").join(format!("{name}.lock"));
    let mut early = system_holder(0, &name);
    let early_pid = acquired_pid(&mut early);
    assert!(
        shared.exists(),
        "the early copy did not use {}",
        shared.display()
    );
    let _dir = ServiceDir::new(&name, SERVICE);
    expect_refused(system_holder(SERVICE, &name), early_pid, "the service");
    expect_refused(
        system_holder(0, &name),
        early_pid,
        "root, after the deployment",
    );
    // The blocking API with the lock file alone takes another road (no runtime): the same.
    expect_refused(
        Proc::spawn(as_user(
            SERVICE,
            SERVICE,
            &bare_holder(
                &[],
                &[
                    &name,
                    "--scope",
                    "system",
                    "--backend",
                    "lockfile",
                    "--blocking",
                ],
            ),
        )),
        early_pid,
        "the service, blocking",
    );
    // `status` sees it as `run` meets it.
    let status = common::output_within_timeout(
        Command::new(common::cli_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["status", "--system", "--backend", "lockfile", &name])
            .stdin(std::process::Stdio::null()),
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "status: {stdout}");
    assert!(stdout.contains(&early_pid.to_string()), "{stdout}");
    // A bounded wait for it ends in a time-out that names it.
    let waiter = bare_holder(
        &[],
        &[
            &name,
            "--scope",
            "system",
            "--backend",
            "lockfile",
            "--wait",
            "0.3",
        ],
    );
    let mut waiter = Proc::spawn(as_user(SERVICE, SERVICE, &waiter));
    let line = waiter.line_starting("");
    assert!(line.starts_with("timed-out"), "{line}");
    assert_eq!(
        field(&line, "holder_pid"),
        Some(early_pid.to_string().as_str())
    );
    assert_eq!(waiter.exit_code(), 75);
    release(early);
    let mut service = system_holder(SERVICE, &name);
    acquired_pid(&mut service);
    release(service);

    // A local user's copy in the shared directory is not believed: it cannot keep the
    // deployed service from running.
    let name = unique_name("before_deploy_squat");
    let mut squatter = system_holder(OTHER, &name);
    acquired_pid(&mut squatter);
    let _dir = ServiceDir::new(&name, SERVICE);
    let mut service = system_holder(SERVICE, &name);
    acquired_pid(&mut service);
    release(service);
    release(squatter);
}

/// A copy already queued in the shared directory when the deployment made the service's own,
/// and the service queued in its own behind the copy they both wait for: when that copy
/// leaves, one of them runs, never both (a review: the service waited on the old file, not
/// the path, and both ran).
#[test]
fn copies_queued_in_both_system_directories_never_both_run() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    const SERVICE: u32 = NOBODY;
    let name = unique_name("both_dirs");
    let waiting = |uid: u32| {
        let cmd = bare_holder(
            &[("RUST_LOG", OsStr::new("info"))],
            &[
                &name,
                "--scope",
                "system",
                "--backend",
                "lockfile",
                "--wait",
                "forever",
            ],
        );
        Proc::spawn(if uid == 0 {
            cmd
        } else {
            as_user(uid, uid, &cmd)
        })
    };
    let mut first = system_holder(0, &name);
    acquired_pid(&mut first);
    let mut queued = waiting(0);
    queued.stderr_line_containing("waiting for the running copy to exit");
    let _dir = ServiceDir::new(&name, SERVICE);
    let mut service = waiting(SERVICE);
    service.stderr_line_containing("waiting for the copy in the other system lock directory");
    release(first);
    // The service holds its own file throughout: the copy in the shared directory, taking its
    // file, meets it and is refused; the service then runs.
    let line = queued.line_starting("");
    assert!(
        line.starts_with("already-running"),
        "the queued copy: {line}"
    );
    acquired_pid(&mut service);
    release(service);
}

/// Who runs is told even when the lock file sits in another user's directory (a service's data
/// directory, looked at by root): the way is refused only for a file nobody holds. It was
/// refused (78, "remove it") though a copy ran there.
#[test]
fn a_running_copy_in_another_users_directory_is_named_not_refused() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes a directory of another user)"
    );
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let lock_file = theirs.join("app.lock");
    let name = unique_name("theirs");
    let mut copy = Proc::spawn(as_user(
        NOBODY,
        NOBODY,
        &bare_holder(
            &[],
            &[
                &name,
                "--backend",
                "lockfile",
                "--lock-file",
                lock_file.to_str().expect("utf-8"),
            ],
        ),
    ));
    let pid = acquired_pid(&mut copy);
    let options = InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&lock_file);
    match options.lock_file_holder() {
        Ok(Some(holder)) => assert_eq!(holder.pid, Some(pid)),
        other => panic!("the running copy was not named: {other:?}"),
    }
    release(copy);
    // Nobody holds it now: the way is refused, as an acquisition refuses it, and nobody is
    // told to remove another user's directory.
    match options.lock_file_holder() {
        Err(e @ Error::UnsafeLockPath { .. }) => {
            assert!(!e.to_string().contains("remove it"), "{e}")
        }
        other => panic!("the way was not refused: {other:?}"),
    }
}

#[test]
fn a_retargeted_symlink_on_the_lock_path_is_a_loss_for_the_holder() {
    let base = tempfile::tempdir().expect("tempdir");
    for v in ["releases/v1", "releases/v2"] {
        std::fs::create_dir_all(base.path().join(v)).expect("mkdir");
    }
    let current = base.path().join("current");
    std::os::unix::fs::symlink("releases/v1", &current).expect("symlink");
    let name = unique_name("flip");
    let env = [("UNIQUE_INSTANCE_LOCK_DIR", current.as_os_str())];
    let mut first = Proc::spawn(bare_holder(
        &env,
        &[&name, "--backend", "lockfile", "--watch"],
    ));
    let first_pid = acquired_pid(&mut first);
    assert!(
        base.path()
            .join(format!("releases/v1/{name}.lock"))
            .exists()
    );
    // A deploy flips the symlink, atomically, as `ln -sfn` through a rename does.
    let next = base.path().join("current.next");
    std::os::unix::fs::symlink("releases/v2", &next).expect("symlink");
    std::fs::rename(&next, &current).expect("rename");
    // The path now leads to another file: the holder must know it no longer excludes.
    let lost = first.line_starting("lost");
    // Our file is still in its own directory: it is the path that no longer leads there.
    assert!(lost.contains("reason=LockDirectoryRemoved"), "{lost}");
    assert!(lost.contains("still_exclusive=false"), "{lost}");
    // (A new copy indeed takes the path's new file.)
    let mut second = Proc::spawn(bare_holder(&env, &[&name, "--backend", "lockfile"]));
    assert_ne!(acquired_pid(&mut second), first_pid);
    release(second);
    release(first);
    // The first removed its own file from its own directory on release.
    assert!(
        !base
            .path()
            .join(format!("releases/v1/{name}.lock"))
            .exists()
    );
}

/// `base/releases/v1` and `v2`, and `base/current -> releases/v1`, the lock directory's path.
fn releases(base: &Path) -> PathBuf {
    for v in ["releases/v1", "releases/v2"] {
        std::fs::create_dir_all(base.join(v)).expect("mkdir");
    }
    let current = base.join("current");
    std::os::unix::fs::symlink("releases/v1", &current).expect("symlink");
    current
}

/// A deploy flips `current` to `releases/v2`, atomically, as `ln -sfn` through a rename does.
fn flip_to_v2(base: &Path) {
    let next = base.join("current.next");
    std::os::unix::fs::symlink("releases/v2", &next).expect("symlink");
    std::fs::rename(&next, base.join("current")).expect("rename");
}

/// A copy made to stop itself at the test hook `var` (see `common::arm_test_hook`).
fn holder_stopping_at(var: &str, env: &[(&str, &OsStr)], args: &[&str]) -> Proc {
    let mut cmd = bare_holder(env, args);
    common::arm_test_hook(&mut cmd, var);
    let mut copy = Proc::spawn(cmd);
    copy.stopped_at(var);
    copy
}

/// A deploy flips `current -> releases/v1` to `v2` while a copy waits (`--wait`) for the
/// holder in v1, and a new copy starts in v2. The waiter must follow the path as it is now: it
/// goes on waiting, for the copy in v2, and takes over from it. Before, it went on judging "is
/// this still the path's directory" by the path it had resolved at the start (v1's, which the
/// flip does not touch): once the holder in v1 stopped (it lost the instance), the waiter took
/// the lock in v1, a directory nobody used any more, beside the copy in v2, and at once lost it
/// (`run --wait` then said the instance was lost, instead of waiting).
#[test]
fn a_waiting_copy_follows_a_flipped_symlink_to_the_live_holder() {
    for blocking in [false, true] {
        let what = if blocking { "blocking" } else { "async" };
        let base = tempfile::tempdir().expect("tempdir");
        let current = releases(base.path());
        let name = unique_name("flip_wait");
        let env = [("UNIQUE_INSTANCE_LOCK_DIR", current.as_os_str())];
        let plain = [name.as_str(), "--backend", "lockfile"];
        let mut first = Proc::spawn(bare_holder(&env, &plain));
        acquired_pid(&mut first);
        let mut args = vec![name.as_str(), "--backend", "lockfile", "--wait", "forever"];
        if blocking {
            args.push("--blocking");
        }
        // Stopped once it waits, on the first holder's file in v1.
        let mut waiter = holder_stopping_at("UNIQUE_INSTANCE_TEST_STOP_IN_LOCK_WAIT", &env, &args);
        flip_to_v2(base.path());
        // A copy started now finds v2 empty and runs; the first is told it lost.
        let mut second = Proc::spawn(bare_holder(&env, &plain));
        let second_pid = acquired_pid(&mut second);
        let lost = first.line_starting("lost");
        assert!(
            lost.contains("reason=LockDirectoryRemoved"),
            "{what}: {lost}"
        );
        waiter.signal(rustix::process::Signal::CONT);
        // The first stops (as `run` stops COMMAND on a loss): its lock in v1 goes.
        release(first);
        // The waiter takes over only from the copy the path leads to now.
        expect_refused(Proc::spawn(bare_holder(&env, &plain)), second_pid, what);
        release(second);
        let waiter_pid = acquired_pid(&mut waiter);
        expect_refused(Proc::spawn(bare_holder(&env, &plain)), waiter_pid, what);
        assert!(
            base.path()
                .join(format!("releases/v2/{name}.lock"))
                .exists(),
            "{what}"
        );
        waiter.close_stdin();
        // Never lost: it took the instance where the path leads.
        assert_eq!(waiter.stdout_until_closed(), ["released"], "{what}");
        assert_eq!(waiter.exit_code(), 0, "{what}");
    }
}

/// The same flip between a copy's opening of the lock directory and its attempt on the lock
/// file (no wait): the copy must lock the file where the path leads now, not in the directory
/// it opened first.
#[test]
fn a_copy_starting_during_a_flip_locks_where_the_path_leads_now() {
    let base = tempfile::tempdir().expect("tempdir");
    let current = releases(base.path());
    let name = unique_name("flip_start");
    let env = [("UNIQUE_INSTANCE_LOCK_DIR", current.as_os_str())];
    let plain = [name.as_str(), "--backend", "lockfile"];
    // Stopped with v1 open, before its lock file.
    let mut copy = holder_stopping_at("UNIQUE_INSTANCE_TEST_STOP_BEFORE_LOCK_FILE", &env, &plain);
    flip_to_v2(base.path());
    copy.signal(rustix::process::Signal::CONT);
    let pid = acquired_pid(&mut copy);
    expect_refused(
        Proc::spawn(bare_holder(&env, &plain)),
        pid,
        "after the flip",
    );
    copy.close_stdin();
    assert_eq!(copy.stdout_until_closed(), ["released"]);
    assert_eq!(copy.exit_code(), 0);
}

#[test]
fn a_foreign_symlink_or_directory_anywhere_on_the_path_is_refused() {
    use unique_instance::UnsafeLockPath;
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes files of another user)"
    );
    let base = tempfile::tempdir().expect("tempdir");
    let real = base.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    // A symlink of another user's to a perfectly safe directory of ours.
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    rustix::fs::chownat(
        rustix::fs::CWD,
        &link,
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("lchown");
    let name = unique_name("foreign_link");
    // A look at who holds it refuses the path as the acquisition does: it said "not
    // running" (a review).
    let attempt = |dir: &Path| {
        let options = InstanceOptions::new(&name)
            .backend(Backend::LockFile)
            .lock_dir(dir);
        let looked = options.lock_file_holder();
        let acquired = options.acquire();
        match (&looked, &acquired) {
            (
                Err(Error::UnsafeLockPath {
                    problem: looked, ..
                }),
                Err(Error::UnsafeLockPath { problem, .. }),
            ) => {
                assert_eq!(looked, problem, "the look and the acquisition disagree")
            }
            (Ok(None), Ok(_)) => {}
            _ => panic!("the look said {looked:?}, the acquisition {acquired:?}"),
        }
        acquired
    };
    match attempt(&link) {
        Err(Error::UnsafeLockPath {
            problem: UnsafeLockPath::ForeignSymlink { link: l, owner },
            ..
        }) => assert_eq!((l, owner), (link.clone(), NOBODY)),
        other => panic!("a foreign symlink on the way was accepted: {other:?}"),
    }
    // Deeper: the link is an ancestor of the lock directory.
    std::fs::create_dir(real.join("sub")).expect("mkdir");
    assert!(matches!(
        attempt(&link.join("sub")),
        Err(Error::UnsafeLockPath {
            problem: UnsafeLockPath::ForeignSymlink { .. },
            ..
        })
    ));
    // A directory of another user's above a directory of ours.
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::create_dir(theirs.join("ours")).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    match attempt(&theirs.join("ours")) {
        Err(Error::UnsafeLockPath {
            problem: UnsafeLockPath::ForeignDirectory { dir, owner },
            ..
        }) => assert_eq!((dir, owner), (theirs.clone(), NOBODY)),
        other => panic!("a foreign directory on the way was accepted: {other:?}"),
    }
    // A world-writable directory without the sticky bit above ours.
    let open = base.path().join("open");
    std::fs::create_dir_all(open.join("ours")).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(
        attempt(&open.join("ours")),
        Err(Error::UnsafeLockPath {
            problem: UnsafeLockPath::InsecureDirectory { .. },
            ..
        })
    ));
    // Our own symlink to our own directory is fine, and nothing was created anywhere above.
    let ours = base.path().join("ours-link");
    std::os::unix::fs::symlink(&real, &ours).expect("symlink");
    let guard = attempt(&ours).expect("our own symlink is followed");
    assert!(real.join(format!("{name}.lock")).exists());
    guard.release().expect("release");
}

/// In a user namespace that does not map the owner of `/` (`unshare --user --map-root-user` run
/// by an ordinary user), `/` shows as owned by the overflow uid, 65534. Who owns it cannot be
/// checked from there, so the path is refused (fail closed), but the refusal once said only
/// "owned by uid 65534 ...; remove it": it now says what that uid means there.
#[test]
fn an_owner_the_user_namespace_does_not_map_is_named_as_such() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it runs a copy as another user)"
    );
    let base = tempfile::tempdir().expect("tempdir");
    let lock_file = base.path().join("x.lock");
    let name = unique_name("unmapped_owner");
    let inner = common::cli_command(
        None,
        base.path(),
        &[
            "run",
            "--backend=lockfile",
            "--lock-file",
            lock_file.to_str().expect("a UTF-8 path"),
            &name,
            "--",
            "echo",
            "ran",
        ],
    );
    let mut userns = Command::new(common::require_program("unshare", "util-linux"));
    userns.args(["--user", "--map-root-user", "--"]);
    let mut copy = Proc::spawn(as_user(NOBODY, NOBODY, &common::wrapped(userns, &inner)));
    assert_eq!(
        copy.stdout_until_closed(),
        Vec::<String>::new(),
        "COMMAND ran"
    );
    let stderr = copy.stderr_until_closed().join("\n");
    // 78 (`EX_CONFIG`): a lock path refused as unsafe is the setup's to fix, not a bug in
    // the tool (70).
    assert_eq!(copy.exit_code(), 78, "{stderr}");
    assert!(
        stderr.contains("directory / is owned by uid 65534")
            && stderr.contains("that is how an owner it does not map shows"),
        "{stderr}"
    );
    assert!(!lock_file.exists(), "nothing was created");
}

/// `cmd` run to its end: how it ended, and what it wrote to stderr.
fn run_to_end(cmd: Command) -> (std::process::ExitStatus, String) {
    let mut proc = Proc::spawn(cmd);
    let stderr = proc.stderr_until_closed().join("\n");
    (proc.wait(), stderr)
}

/// The CLI with `args` and `UNIQUE_INSTANCE_LOCK_DIR=lock_dir`, under strace tracing `trace`
/// (its processes and their children) with `injects` (each `inject=SYSCALL:...`): a system
/// call delayed, failed, or the copy killed at it.
fn run_under_strace(lock_dir: &Path, trace: &str, injects: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new(common::require_program("strace", "strace"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", lock_dir)
        .args(["-f", "-o", "/dev/null", "-e", &format!("trace={trace}")]);
    for inject in injects {
        cmd.args(["-e", inject]);
    }
    cmd.arg("--").arg(common::cli_path()).args(args);
    cmd
}

/// `run` as `nobody` with `UNIQUE_INSTANCE_LOCK_DIR=lock_dir` under `umask`, COMMAND `true`.
fn run_as_nobody_under_umask(
    lock_dir: &Path,
    name: &str,
    umask: &str,
) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", lock_dir)
        .arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(common::cli_path())
        .args([
            "run",
            "--system",
            "--backend",
            "lockfile",
            name,
            "--",
            "true",
        ]);
    run_to_end(as_user(NOBODY, NOBODY, &cmd))
}

/// A lock directory is made with its mode whatever the umask: one that leaves its owner no
/// read permission (`umask 0477`) made a directory its maker could not open to give it its
/// mode, and every copy after, under any umask, was refused (77) for good (a review). In a
/// parent its group may write too (a home directory with a private group), where the mode is
/// not given by the directory's name (another review: 77 there).
#[test]
fn a_strict_umask_never_leaves_an_unusable_lock_directory() {
    use std::os::unix::fs::MetadataExt;
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for parent_mode in [0o755, 0o775] {
        let parent = base.path().join(format!("nobodys{parent_mode:o}"));
        std::fs::create_dir(&parent).expect("mkdir");
        std::os::unix::fs::chown(&parent, Some(NOBODY), Some(NOBODY)).expect("chown");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(parent_mode))
            .expect("chmod");
        for umask in ["0477", "0777", "022"] {
            let what = format!("parent {parent_mode:o}, umask {umask}");
            let lock_dir = parent.join(format!("locks{umask}"));
            let name = unique_name("umask_dir");
            for round in 0..2 {
                let (status, stderr) = run_as_nobody_under_umask(&lock_dir, &name, umask);
                assert_eq!(status.code(), Some(0), "{what}, round {round}: {stderr}");
            }
            let meta = std::fs::metadata(&lock_dir).expect("the lock directory");
            assert_eq!(meta.mode() & 0o7777, 0o755, "{what}");
            assert_eq!(meta.uid(), NOBODY, "{what}");
        }
    }
}

/// A lock directory made where its group may rename (a parent `0775`: `/run/lock` on some
/// hosts, a home directory with a private group) is made with its mode; a directory swapped in
/// for it (here strace holds the copy just after its `mkdir`, and a directory is renamed over
/// the one made) is never given that mode. Reviews saw root make another user's private
/// directory `0755`, its contents readable by all, then (the check being "private, empty and
/// ours") root's own empty `/run/lock/lvm` world-writable, then (the check being "born since
/// our `mkdir`") a directory another root job had just made. Now the directory gets its mode
/// from its `mkdir` alone; the victim, found at the name, is used or refused as it is. Where
/// `unshare` is refused, the directory is made under a temporary name, and a victim swapped in
/// there is not given the mode either (that copy makes another and runs).
#[test]
fn a_directory_swapped_in_for_a_new_lock_directory_never_gets_its_mode() {
    use std::os::unix::fs::MetadataExt;
    for (fallback, victim_owner) in [(false, NOBODY), (false, 0), (true, NOBODY), (true, 0)] {
        let what = format!("fallback={fallback}, victim's owner {victim_owner}");
        let base = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let parent = base.path().join("shared");
        std::fs::create_dir(&parent).expect("mkdir");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let victim = parent.join("victim");
        let make_victim = || {
            std::fs::create_dir(&victim).expect("mkdir");
            if victim_owner != 0 {
                std::fs::write(victim.join("secret"), "secret").expect("write");
                for path in [victim.join("secret"), victim.clone()] {
                    std::os::unix::fs::chown(&path, Some(victim_owner), Some(victim_owner))
                        .expect("chown");
                }
            }
            std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
        };
        if fallback {
            // Older than what the copy makes (the fallback tells them apart by birth time,
            // which cannot tell one made in the same moment): not synchronisation, its age.
            make_victim();
            let born = std::fs::metadata(&victim)
                .and_then(|m| m.created())
                .expect("btime");
            while born.elapsed().unwrap_or_default() < std::time::Duration::from_millis(200) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let lock_dir = parent.join("locks");
        let name = unique_name("swapped_dir");
        let mut injects = vec!["inject=mkdirat:delay_exit=2000000:when=1"];
        if fallback {
            injects.push("inject=unshare:error=EPERM");
        }
        let mut copy = Proc::spawn(run_under_strace(
            &lock_dir,
            "mkdirat,unshare",
            &injects,
            &["run", "--backend", "lockfile", &name, "--", "true"],
        ));
        // The directory the copy has just made, at its name or a temporary one.
        let deadline = std::time::Instant::now() + common::TIMEOUT;
        let made = loop {
            let made = std::fs::read_dir(&parent)
                .expect("read_dir")
                .filter_map(Result::ok)
                .map(|entry| entry.file_name())
                .find(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(".unique-instance.") || n == "locks"
                });
            if let Some(made) = made {
                break parent.join(made);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: the copy made nothing"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        if !fallback {
            // Born after the copy's `mkdir`, as a directory another root job makes then is.
            make_victim();
        }
        std::fs::rename(&victim, &made).expect("swap the victim in");
        let stderr = copy.stderr_until_closed().join("\n");
        let code = copy.wait().code();
        let swapped = std::fs::metadata(&made).expect("the victim, where it was swapped");
        assert_eq!(
            (swapped.mode() & 0o7777, swapped.uid()),
            (0o700, victim_owner),
            "{what}: the victim was changed; the copy said {code:?} {stderr}"
        );
        if fallback {
            assert_eq!(code, Some(0), "{what}: {stderr}");
            let made = std::fs::metadata(&lock_dir).expect("the lock directory");
            assert_eq!((made.mode() & 0o7777, made.uid()), (0o755, 0), "{what}");
        } else {
            // Found at the name: another user's is refused, root's own used as it is.
            let expected = if victim_owner == 0 { 0 } else { 78 };
            assert_eq!(code, Some(expected), "{what}: {stderr}");
        }
    }
}

/// A default ACL on the lock directory's parent decides a new directory's permissions, not the
/// mode `mkdir` asks for: made in one `mkdir`, the directory got 0750 here (and the shared
/// system directory 1775, every other user refused for good: a review). It is given its mode
/// after, as it is made where `unshare` is refused.
#[test]
fn a_default_acl_on_the_parent_does_not_decide_the_lock_directorys_mode() {
    use std::os::unix::fs::MetadataExt;
    let setfacl = common::require_program("setfacl", "acl");
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut acl = Command::new(setfacl);
    acl.args(["-d", "-m", "o::---"]).arg(base.path());
    assert!(common::status_within_timeout(acl).success(), "setfacl");
    let lock_dir = base.path().join("locks");
    let name = unique_name("default_acl");
    let mut cmd = Command::new(common::cli_path());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", &lock_dir)
        .args(["run", "--backend", "lockfile", &name, "--", "true"]);
    let (status, stderr) = run_to_end(cmd);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let made = std::fs::metadata(&lock_dir).expect("the lock directory");
    assert_eq!(
        made.mode() & 0o7777,
        0o755,
        "the default ACL decided the mode"
    );
}

/// Where `unshare` is refused (a sandbox) and the file system cannot rename a directory into
/// place (`RENAME_NOREPLACE`; both refused here by strace), the directory is made at its name
/// and given its mode once opened, even
/// when another copy has made its lock file in it meanwhile (a review: the mode was then
/// skipped, and the umask's `0700` kept every other user out for good).
#[test]
fn a_lock_directory_made_at_its_name_gets_its_mode_though_another_copy_used_it() {
    use std::os::unix::fs::MetadataExt;
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let lock_dir = base.path().join("locks");
    let name = unique_name("fallback_dir");
    // Its `mkdir` at the name held 3 s, once the rename was refused.
    let mut first = Proc::spawn(run_under_strace(
        &lock_dir,
        "mkdirat,renameat2,unshare",
        &[
            "inject=unshare:error=EPERM",
            "inject=renameat2:error=EINVAL",
            "inject=mkdirat:delay_exit=3000000:when=2",
        ],
        &["run", "--backend", "lockfile", &name, "--", "true"],
    ));
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !lock_dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no lock directory made"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Meanwhile another copy makes its lock file there, and holds it.
    let mut second = common::holder(None, &lock_dir, &[&name, "--backend", "lockfile"]);
    assert!(second.next_line("second copy").starts_with("acquired"));
    let stderr = first.stderr_until_closed().join("\n");
    assert_eq!(first.wait().code(), Some(75), "the first copy: {stderr}");
    let made = std::fs::metadata(&lock_dir).expect("the lock directory");
    assert_eq!((made.mode() & 0o7777, made.uid()), (0o755, 0));
    second.close_stdin();
    assert_eq!(second.exit_code(), 0);
}

/// A copy killed as it made the lock directory (here: at its first `chmod`, by strace) leaves
/// no directory at its name with another mode than its own: root's killed so left a `0700`
/// directory that refused every other user's copy for good (a review). Now the directory has
/// its mode from its `mkdir`; where `unshare` is refused, it is made under a temporary name,
/// which the kill leaves, and the next copy, another user's, makes it and runs.
#[test]
fn a_copy_killed_making_the_lock_directory_leaves_none_half_made() {
    // Like /run/lock: root's, sticky, writable by all.
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    // In one `mkdir` on a thread with its own umask; and where `unshare` is refused (a
    // sandbox), under a temporary name.
    for fallback in [false, true] {
        let lock_dir = base.path().join(format!("locks{fallback}"));
        let name = unique_name("dir_killed");
        let mut injects = vec!["inject=fchmod,fchmodat:signal=KILL:when=1"];
        if fallback {
            injects.push("inject=unshare:error=EPERM");
        }
        let (killed, stderr) = run_to_end(run_under_strace(
            &lock_dir,
            "fchmod,fchmodat,unshare",
            &injects,
            &[
                "run",
                "--system",
                "--backend",
                "lockfile",
                &name,
                "--",
                "true",
            ],
        ));
        assert_ne!(
            killed.code(),
            Some(0),
            "fallback={fallback}: root's copy was not killed at its chmod: {stderr}"
        );
        if fallback {
            // The temporary directory is left; the name is free for another user's copy.
            let (status, stderr) = run_as_nobody_under_umask(&lock_dir, &name, "022");
            assert_eq!(
                status.code(),
                Some(0),
                "fallback={fallback}: another user's copy after root's was killed: {stderr}"
            );
        } else {
            // No chmod of the directory at all: killed at its lock file's, the directory was
            // whole already, with its mode.
            use std::os::unix::fs::MetadataExt;
            let made = std::fs::metadata(&lock_dir).expect("the lock directory");
            assert_eq!((made.mode() & 0o7777, made.uid()), (0o755, 0));
        }
    }
}

#[test]
fn the_umask_does_not_decide_who_can_see_the_instance() {
    use std::os::unix::fs::MetadataExt;
    // Like /run/lock/unique-instance: root's, sticky, writable by all.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let name = unique_name("umask");
    let mut holder_cmd = Command::new("sh");
    holder_cmd
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", dir.path())
        .arg("-c")
        .arg("umask 077; exec \"$0\" \"$@\"")
        .arg(example_path("holder"))
        .args([name.as_str(), "--scope", "system", "--backend", "lockfile"]);
    let mut root = Proc::spawn(holder_cmd);
    let root_pid = acquired_pid(&mut root);
    let lock_file = dir.path().join(format!("{name}.lock"));
    assert_eq!(
        std::fs::metadata(&lock_file).expect("meta").mode() & 0o7777,
        0o644,
        "the umask decided the lock file's mode"
    );
    let cli_as_nobody = |args: &[&str]| {
        let mut cmd = Command::new(common::cli_path());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNIQUE_INSTANCE_LOCK_DIR", dir.path())
            .args(args);
        let mut cmd = as_user(NOBODY, NOBODY, &cmd);
        common::output_within_timeout(&mut cmd)
    };
    let status = cli_as_nobody(&["status", "--system", "--backend", "lockfile", &name]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status.status.code(),
        Some(0),
        "status as another user: {stdout} {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(stdout.contains(&root_pid.to_string()), "{stdout}");
    let run = cli_as_nobody(&[
        "run",
        "--system",
        "--backend",
        "lockfile",
        &name,
        "--",
        "true",
    ]);
    assert_eq!(
        run.status.code(),
        Some(75),
        "run as another user: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    release(root);
}

/// Another user who made this user's lock directory first (a 0700 directory of theirs, which
/// this user cannot even open) blocks this user's instances: that must be said plainly, naming
/// the directory and its owner, not as a bare "permission denied".
#[test]
fn a_user_directory_squatted_by_another_user_is_named_with_its_owner() {
    // A user with no other use on this machine, so no real instance is disturbed.
    let uid = 420_000 + std::process::id() % 10_000;
    // The base (/run/lock or /tmp) is the same for every user: take it from our own plan.
    let plan = InstanceOptions::new("org.example.Unused")
        .scope(Scope::User)
        .backend(Backend::LockFile)
        .plan()
        .expect("plan");
    let mine = plan.lock_file.expect("lock file");
    let base = mine.parent().and_then(Path::parent).expect("base");
    let squatted = base.join(format!("unique-instance-{uid}"));
    let _ = std::fs::remove_dir(&squatted);
    std::fs::create_dir(&squatted).expect("mkdir");
    std::fs::set_permissions(&squatted, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(&squatted, Some(1), Some(1)).expect("chown");
    let mut cmd = Command::new(common::cli_path());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args([
            "run",
            "--user",
            "--backend",
            "lockfile",
            &unique_name("squatted"),
            "--",
            "true",
        ]);
    let mut copy = Proc::spawn(as_user(uid, uid, &cmd));
    let code = copy.exit_code();
    let stderr = copy.stderr_until_closed().join("\n");
    std::fs::remove_dir(&squatted).expect("rmdir");
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&squatted.display().to_string()) && stderr.contains("uid 1"),
        "the error must name the directory and its owner: {stderr}"
    );
}

/// `/proc/self/cwd`, `/proc/self/root`, `/proc/thread-self`... are not ordinary symlinks: each
/// process that follows one lands in its own place. Two copies given `/proc/self/cwd/x.lock` from
/// two directories once both ran, each holding the `x.lock` of its own directory. A way that
/// follows a link in procfs (given directly, through the lock directory variable, or through a
/// symlink of the user's that points into /proc/self) is refused as an unsafe lock path, by
/// `run` and by `status`, naming the path and saying to use a real directory.
#[test]
fn a_lock_path_through_proc_self_is_refused_not_two_files() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let links = tempfile::tempdir().expect("tempdir");
    let into_proc = links.path().join("here");
    std::os::unix::fs::symlink("/proc/self/cwd", &into_proc).expect("symlink");
    let name = unique_name("proc_self");
    let through_link = into_proc.join("x.lock");
    let through_link = through_link.to_str().expect("a UTF-8 path");
    let cli = |cwd: &Path, env: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(common::cli_path());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(cwd)
            .stdin(std::process::Stdio::null())
            .args(args);
        if let Some(dir) = env {
            cmd.env("UNIQUE_INSTANCE_LOCK_DIR", dir);
        }
        cmd
    };
    let ways: [(Option<&str>, &[&str]); 4] = [
        (None, &["--lock-file", "/proc/self/cwd/x.lock"]),
        (None, &["--lock-file", "/proc/thread-self/cwd/x.lock"]),
        (None, &["--lock-file", through_link]),
        (Some("/proc/self/cwd"), &[]),
    ];
    for (env, lock_args) in ways {
        let what = format!("{env:?} {lock_args:?}");
        // The first copy, from `a`, holding for a while: never allowed to start.
        let mut args = vec!["run", "--backend", "lockfile"];
        args.extend_from_slice(lock_args);
        args.extend_from_slice(&[&name, "--", "sleep", "2"]);
        let mut first = Proc::spawn(cli(a.path(), env, &args));
        let mut args = vec!["run", "--backend", "lockfile"];
        args.extend_from_slice(lock_args);
        args.extend_from_slice(&[&name, "--", "echo", "second"]);
        let second = common::output_within_timeout(&mut cli(b.path(), env, &args));
        let first_code = first.exit_code();
        let first_err = first.stderr_until_closed().join("\n");
        let second_err = String::from_utf8_lossy(&second.stderr);
        assert_eq!(first_code, 78, "{what}: first copy: {first_err}");
        assert_eq!(
            second.status.code(),
            Some(78),
            "{what}: second copy: {second_err}; stdout {:?}",
            String::from_utf8_lossy(&second.stdout)
        );
        assert!(
            second_err.contains("/proc") && second_err.contains("use a real directory"),
            "{what}: the error must name the path and say what to do: {second_err}"
        );
        let mut args = vec!["status", "--backend", "lockfile"];
        args.extend_from_slice(lock_args);
        args.push(&name);
        let status = common::output_within_timeout(&mut cli(b.path(), env, &args));
        assert_eq!(
            status.status.code(),
            Some(78),
            "{what}: status: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    for dir in [a.path(), b.path()] {
        assert_eq!(
            std::fs::read_dir(dir).expect("read_dir").count(),
            0,
            "a lock file was made in {}",
            dir.display()
        );
    }
}

/// The grace another user's unheld file gets (to be held again, or to go, as a release leaves
/// it for a moment) does not block an async acquisition's runtime: on a current-thread
/// runtime, a task of the program runs meanwhile (a review: the grace slept on the runtime's
/// thread, stalling every task for up to 300 ms and stretching a shorter `--wait`). Here that
/// task removes the file, and the copy then acquires; before, it could not run, and the copy
/// was refused.
#[test]
fn the_grace_for_another_users_unheld_file_does_not_block_the_runtime() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes a file of root's in another user's directory)"
    );
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = base.path().join("locks");
    std::fs::create_dir(&dir).expect("mkdir");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    let name = unique_name("grace_yields");
    let planted = dir.join(format!("{name}.lock"));
    std::fs::write(&planted, "").expect("root's file");
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut cmd = Command::new(example_path("lifecycle"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", &dir)
        .env("UNIQUE_INSTANCE_SCOPE", "system")
        .args(["settle-yields", &name, "--backend", "lockfile", "--remove"])
        .arg(&planted);
    let mut copy = Proc::spawn(as_user(NOBODY, NOBODY, &cmd));
    let line = copy.next_line("settle-yields");
    assert_eq!(line, "acquired", "stderr: {:?}", copy.stderr_lines());
    assert_eq!(copy.exit_code(), 0);
}

/// A lock file root is creating under a restrictive umask (077, as systemd's `UMask=0077`
/// hardening sets) was once briefly visible at its name with the mode the umask left (0600),
/// before root gave it its intended one: another user who looked then (`status`, or `run` in
/// the shared sticky directory) was told "not permitted" (77), about 1 look in 20 while root
/// churned. It now gets its name only once it has its mode: every answer is held, free, or
/// already running.
#[test]
fn another_users_file_being_created_under_a_strict_umask_is_never_a_refusal() {
    // The lock directory root's copies make (system scope), and a shared sticky one like
    // /run/lock/unique-instance, where another user's copy creates files too.
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sticky = base.path().join("sticky");
    std::fs::create_dir(&sticky).expect("mkdir");
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let cli = common::cli_path();
    let cli = cli.to_str().expect("a UTF-8 path");
    for (dir, what, probe) in [
        (
            base.path().join("locks"),
            "status",
            "status --system --backend lockfile",
        ),
        (sticky.clone(), "run", "run --system --backend lockfile"),
    ] {
        let name = unique_name("umask_create");
        let tail = if what == "run" { " -- true" } else { "" };
        let critical = base.path().join(format!("{what}.critical"));
        let mut churn = Command::new("sh");
        churn
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNIQUE_INSTANCE_LOCK_DIR", &dir)
            .env("UNIQUE_INSTANCE_SCOPE", "system")
            .arg("-c")
            .arg("umask 077; exec \"$0\" \"$@\"")
            .arg(example_path("churn"))
            .args([name.as_str(), "100000000"])
            .arg(&critical);
        let mut root = Proc::spawn(churn);
        let mut looks = Command::new("sh");
        looks
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNIQUE_INSTANCE_LOCK_DIR", &dir)
            .arg("-c")
            .arg(format!(
                "i=0; while [ $i -lt 400 ]; do i=$((i+1)); \
                 {cli} {probe} {name}{tail} >/dev/null 2>&1 </dev/null; \
                 echo $?; done"
            ));
        let looks = common::output_within_timeout(&mut as_user(NOBODY, NOBODY, &looks));
        root.sigkill();
        let _ = std::fs::remove_file(&critical);
        let said = root.stdout_until_closed();
        assert!(
            said.iter().all(|line| line.starts_with("progress")),
            "{what}: root's churn under umask 077 failed: {said:?} {:?}",
            root.stderr_lines()
        );
        assert!(!said.is_empty(), "{what}: root churned under 1000 times");
        let codes = String::from_utf8_lossy(&looks.stdout);
        let mut counts = std::collections::BTreeMap::<&str, u32>::new();
        for code in codes.lines() {
            *counts.entry(code).or_default() += 1;
        }
        let allowed: &[&str] = if what == "status" {
            &["0", "3"]
        } else {
            &["0", "75"]
        };
        assert!(
            counts.keys().all(|code| allowed.contains(code)),
            "{what} as another user while root churns under umask 077: exit codes {counts:?} \
             (77: not permitted)"
        );
        assert_eq!(counts.values().sum::<u32>(), 400, "{what}: {counts:?}");
    }
}

/// A lock path in a directory where no file can be made (`/proc`) is the user's to change (64),
/// said at once: it was taken for a directory removed under the copy again and again, and
/// given up on as an internal error (70) after a thousand tries (a review).
#[test]
fn a_lock_path_where_no_file_can_be_made_is_a_usage_error() {
    let name = unique_name("procfs");
    for (what, options, env) in [
        (
            "lock directory",
            vec![],
            vec![("UNIQUE_INSTANCE_LOCK_DIR", "/proc")],
        ),
        (
            "lock file",
            vec!["--lock-file", "/proc/unique-instance.lock"],
            vec![],
        ),
    ] {
        let mut cmd = Command::new(common::cli_path());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .args(["run", "--backend", "lockfile"])
            .args(options)
            .args([name.as_str(), "--", "true"]);
        let (status, stderr) = run_to_end(cmd);
        assert_eq!(status.code(), Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains("no file can be made in /proc"),
            "{what}: {stderr}"
        );
    }
}

/// `status` refuses what `run` refuses, with the same exit code, rather than saying "not
/// running" (3) or "internal error" (70) (a review): a per-user lock directory whose mode was
/// loosened, another user's file given as the lock file, and lock paths that cannot name a file
/// (a file on the way, a symbolic link loop, a name too long).
#[test]
fn status_refuses_what_run_refuses() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test makes files of other users and must run as root (CI does)"
    );
    let code = |uid: u32, args: &[&str], env: &[(&str, &OsStr)]| -> i32 {
        let mut cmd = Command::new(common::cli_path());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let cmd = if uid == 0 {
            cmd
        } else {
            as_user(uid, uid, &cmd)
        };
        common::status_within_timeout(cmd)
            .code()
            .expect("an exit code")
    };
    let both = |uid: u32, options: &[&str], env: &[(&str, &OsStr)], expected: i32, what: &str| {
        let name = unique_name("status_as_run");
        let mut run = vec!["run"];
        run.extend_from_slice(options);
        run.extend_from_slice(&[&name, "--", "true"]);
        let mut status = vec!["status"];
        status.extend_from_slice(options);
        status.push(&name);
        assert_eq!(code(uid, &run, env), expected, "{what}: run");
        assert_eq!(code(uid, &status, env), expected, "{what}: status");
    };

    // A per-user directory made 0755.
    const USER: u32 = 4_000_126;
    let user_dir = Path::new("/run/lock").join(format!("unique-instance-{USER}"));
    let _ = std::fs::remove_dir_all(&user_dir);
    std::fs::create_dir(&user_dir).expect("mkdir");
    std::os::unix::fs::chown(&user_dir, Some(USER), Some(USER)).expect("chown");
    std::fs::set_permissions(&user_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    both(
        USER,
        &["--user", "--backend", "lockfile"],
        &[],
        78,
        "a per-user directory made 0755",
    );
    std::fs::remove_dir_all(&user_dir).expect("clean up");

    // Another user's file given as the lock file, in a directory of root's.
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let theirs = base.path().join("theirs.lock");
    std::fs::write(&theirs, "").expect("their file");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let theirs = theirs.to_str().expect("UTF-8");
    both(
        0,
        &["--backend", "lockfile", "--lock-file", theirs],
        &[],
        78,
        "another user's file",
    );
    assert_eq!(std::fs::metadata(theirs).expect("their file").len(), 0);

    // Paths that cannot name a lock file.
    let file = base.path().join("a-file");
    std::fs::write(&file, "").expect("a file");
    let through_file = format!("{}/x.lock", file.display());
    let looped = base.path().join("loop");
    std::os::unix::fs::symlink("loop", &looped).expect("symlink");
    let through_loop = format!("{}/x.lock", looped.display());
    let too_long = format!("{}/{}.lock", base.path().display(), "a".repeat(300));
    for (path, what) in [
        (through_file.as_str(), "a file on the way"),
        (through_loop.as_str(), "a symbolic link loop"),
        (too_long.as_str(), "a name too long"),
    ] {
        both(
            0,
            &["--backend", "lockfile", "--lock-file", path],
            &[],
            64,
            what,
        );
    }
    let dev_null = OsStr::new("/dev/null");
    both(
        0,
        &["--backend", "lockfile"],
        &[("UNIQUE_INSTANCE_LOCK_DIR", dev_null)],
        64,
        "a lock directory that is a file",
    );

    // Directories that an acquisition would not make, missing (a review: `run` said 64 and
    // `status` "not running", 3).
    let missing = base.path().join("missing");
    let in_missing = format!("{}/x.lock", missing.display());
    let deeper = format!("{}/deeper/x.lock", missing.display());
    for (path, what) in [
        (in_missing.as_str(), "a lock file's directory missing"),
        (deeper.as_str(), "a lock file's directories missing"),
    ] {
        both(
            0,
            &["--backend", "lockfile", "--lock-file", path],
            &[],
            64,
            what,
        );
    }
    let missing_parent = missing.join("deeper");
    both(
        0,
        &["--backend", "lockfile"],
        &[("UNIQUE_INSTANCE_LOCK_DIR", missing_parent.as_os_str())],
        64,
        "a directory above a lock directory missing",
    );
    assert!(!missing.exists(), "a directory was made");
}

/// The service's own lock directory removed while a copy that planned it starts (its
/// deployment removed): a clear "start it again" (69), not an internal error (70, a review).
#[test]
fn a_service_directory_removed_as_a_copy_starts_is_no_internal_error() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it makes /run/unique-instance/NAME)"
    );
    let name = unique_name("service_dir_gone");
    let dir = ServiceDir::new(&name, 0);
    let mut cmd = bare_holder(&[], &[&name, "--scope", "system", "--backend", "lockfile"]);
    common::arm_test_hook(&mut cmd, "UNIQUE_INSTANCE_TEST_STOP_BEFORE_LOCK_FILE");
    let mut copy = Proc::spawn(cmd);
    copy.stopped_at("before the lock file");
    std::fs::remove_dir_all(&dir.0).expect("remove the service's directory");
    copy.signal(rustix::process::Signal::CONT);
    let line = copy.line_starting("");
    assert!(line.starts_with("no-usable-backend"), "{line}");
    assert!(line.contains("was removed"), "{line}");
    assert_eq!(copy.exit_code(), 69);
}
