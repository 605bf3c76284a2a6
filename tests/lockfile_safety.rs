//! The lock file's safety rules, in process and across processes.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{NOBODY, Proc, field, holder, holder_as, unique_name};
use nix::libc;
use unique_instance::{Backend, Error, InstanceOptions, Scope, UnsafeLockPath};

fn lock_only(name: &str, dir: &Path) -> InstanceOptions {
    InstanceOptions::new(name)
        .backend(Backend::LockFile)
        .lock_dir(dir)
}

fn unsafe_problem(
    result: unique_instance::Result<unique_instance::InstanceGuard>,
) -> UnsafeLockPath {
    match result {
        Err(Error::UnsafeLockPath { problem, .. }) => problem,
        other => panic!("expected an unsafe lock path error, got {other:?}"),
    }
}

#[test]
fn symlink_at_lock_path_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("symlink");
    let target = dir.path().join("precious");
    std::fs::write(&target, "do not truncate me\n").expect("write target");
    std::os::unix::fs::symlink(&target, dir.path().join(format!("{name}.lock"))).expect("symlink");
    let before = std::fs::metadata(&target).expect("meta");
    assert_eq!(
        unsafe_problem(lock_only(&name, dir.path()).acquire()),
        UnsafeLockPath::Symlink
    );
    assert_eq!(
        std::fs::read_to_string(&target).expect("read"),
        "do not truncate me\n"
    );
    let after = std::fs::metadata(&target).expect("meta");
    assert_eq!(
        (before.ino(), before.mtime_nsec(), before.mode()),
        (after.ino(), after.mtime_nsec(), after.mode())
    );
    // A dangling symlink is refused too, and creates nothing where it points.
    let name2 = unique_name("dangling");
    let nowhere = dir.path().join("nowhere");
    std::os::unix::fs::symlink(&nowhere, dir.path().join(format!("{name2}.lock")))
        .expect("symlink");
    assert_eq!(
        unsafe_problem(lock_only(&name2, dir.path()).acquire()),
        UnsafeLockPath::Symlink
    );
    assert!(!nowhere.exists());
}

#[test]
fn fifo_directory_and_foreign_owner_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo_name = unique_name("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.path().join(format!("{fifo_name}.lock")),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    assert_eq!(
        unsafe_problem(lock_only(&fifo_name, dir.path()).acquire()),
        UnsafeLockPath::NotRegularFile { kind: "FIFO" }
    );

    let dir_name = unique_name("dir");
    std::fs::create_dir(dir.path().join(format!("{dir_name}.lock"))).expect("mkdir");
    assert_eq!(
        unsafe_problem(lock_only(&dir_name, dir.path()).acquire()),
        UnsafeLockPath::NotRegularFile { kind: "directory" }
    );

    let euid = rustix::process::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test plants a file owned by another user and must run as root (CI does)"
    );
    let foreign_name = unique_name("foreign");
    let foreign = dir.path().join(format!("{foreign_name}.lock"));
    std::fs::write(&foreign, "").expect("write");
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
    assert_eq!(
        unsafe_problem(lock_only(&foreign_name, dir.path()).acquire()),
        UnsafeLockPath::WrongOwner {
            owner: 65534,
            expected: 0
        }
    );
    assert_eq!(
        std::fs::metadata(&foreign).expect("meta").uid(),
        65534,
        "left as it was"
    );
}

/// A FIFO named as the lock path is refused without ever being opened: opening its read end
/// (even `O_NONBLOCK`, and closing it at once) would release a writer blocked in `open`, which
/// would then die of SIGPIPE on its first write, its data lost. Here `echo important > FIFO` is
/// blocked in `open` when `run` and `status` are refused the path, and must still be: opened by
/// us afterwards, the FIFO gives its data, and the writer exits 0.
#[test]
fn a_fifo_at_the_lock_path_is_never_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("someones.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let fifo_arg = fifo.to_str().expect("a UTF-8 path");
    let mut sh = Command::new(common::require_program("sh", "dash"));
    sh.args(["-c", "echo ready; echo important > \"$1\"", "sh", fifo_arg]);
    let mut writer = Proc::spawn(sh);
    writer.expect_line("ready");
    // Blocked in `open` (sleeping in `openat`), waiting for a reader: dash's `echo` is built
    // in, so the shell itself opens the FIFO.
    let syscall = format!("/proc/{}/syscall", writer.pid());
    let deadline = Instant::now() + common::TIMEOUT;
    while !std::fs::read_to_string(&syscall)
        .is_ok_and(|s| s.split_whitespace().next() == Some(&libc::SYS_openat.to_string()))
    {
        assert!(
            Instant::now() < deadline,
            "the writer never blocked opening the FIFO"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let name = unique_name("fifo_writer");
    for args in [
        &[
            "run",
            "--backend=lockfile",
            "--lock-file",
            fifo_arg,
            &name,
            "--",
            "true",
        ][..],
        &["status", "--lock-file", fifo_arg, &name][..],
    ] {
        let mut copy = common::cli(None, dir.path(), args);
        let stderr = copy.stderr_until_closed().join("\n");
        assert_eq!(copy.exit_code(), 78, "{args:?}: {stderr}");
        assert!(stderr.contains("it is a FIFO"), "{args:?}: {stderr}");
    }
    // Through the library too.
    assert_eq!(
        unsafe_problem(
            InstanceOptions::new(&name)
                .backend(Backend::LockFile)
                .lock_file(&fifo)
                .acquire()
        ),
        UnsafeLockPath::NotRegularFile { kind: "FIFO" }
    );
    // The first reader: the writer's `open` returns now, and its data arrives. (Had a copy
    // opened the FIFO, the writer would be gone and this open would wait for a writer forever.)
    let (tx, rx) = std::sync::mpsc::channel();
    let reader_path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(reader_path));
    });
    match rx.recv_timeout(common::TIMEOUT) {
        Ok(read) => assert_eq!(read.expect("read the FIFO"), "important\n"),
        Err(_) => {
            // Unblock our reader before failing.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!(
                "the FIFO's writer is gone: a refused copy opened the FIFO and released it \
                 (stderr: {:?})",
                writer.stderr_lines()
            );
        }
    }
    assert_eq!(writer.exit_code(), 0, "the writer wrote its data");
}

#[test]
fn world_writable_directory_needs_the_sticky_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("wwdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(
        unsafe_problem(lock_only(&name, dir.path()).acquire()),
        UnsafeLockPath::InsecureDirectory { mode: 0o777, .. }
    ));
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "nothing created"
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let guard = lock_only(&name, dir.path())
        .acquire()
        .expect("sticky directory is fine");
    guard.release().expect("release");
}

#[test]
fn lock_file_mode_and_removal_on_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("mode");
    let guard = lock_only(&name, dir.path()).acquire().expect("acquire");
    let path = guard.lock_file().expect("lock file").to_owned();
    let meta = std::fs::metadata(&path).expect("meta");
    assert!(meta.is_file());
    // Root gets the system-scope mode (0644); anyone else the user-scope one (0600).
    let expected = if rustix::process::geteuid().is_root() {
        0o644
    } else {
        0o600
    };
    assert_eq!(meta.mode() & 0o777, expected);
    let record = std::fs::read_to_string(&path).expect("record");
    assert_eq!(record.lines().count(), 1, "{record}");
    let json: serde_json::Value = serde_json::from_str(&record).expect("one-line JSON");
    assert_eq!(json["pid"], std::process::id());
    for key in [
        "uid",
        "start_time",
        "backend",
        "bus_unique_name",
        "executable",
        "hostname",
    ] {
        assert!(json.get(key).is_some(), "record lacks {key}: {record}");
    }
    guard.release().expect("release");
    assert!(!path.exists(), "the lock file is removed on release");
}

/// The path is unlinked and recreated while a waiter blocks on the old inode. When the holder
/// goes, the waiter must lock the file the path names now, not the orphan: a newcomer is then
/// refused. Without the lock-then-recheck, both would hold "the" lock.
#[test]
fn unlinked_and_recreated_file_never_yields_two_holders() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..20 {
        let name = unique_name("recreate");
        let path = dir.path().join(format!("{name}.lock"));
        let mut h = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
        assert!(h.next_line("holder").starts_with("acquired"));
        // It says (at `info`) when it was refused and starts waiting: then, not after a guessed
        // delay, the path changes under it, so every round tests a waiter that is waiting.
        let mut w = {
            let mut cmd = common::clean_command(&common::example_path("holder"), None, dir.path());
            cmd.args([&name, "--backend", "lockfile", "--wait", "forever"])
                .env("RUST_LOG", "unique_instance=info");
            common::Proc::spawn(cmd)
        };
        w.stderr_line_containing("waiting for the running copy to exit");
        // Unlink + recreate now, in one step (a new file renamed over the path): a waiter sees
        // the path change at once (inotify) and may take the new file while the holder still
        // holds the orphan, and a plain write after an unlink would then truncate the record of
        // the waiter's own file.
        // The new file is a crashed holder's (an empty one would be someone else's, kept, in
        // which nothing of ours is written, and the newcomer below could not name its holder).
        let new_file = dir.path().join(format!("{name}.new"));
        let gone_pid = common::gone_pid();
        let crashed = format!(
            "{{\"pid\":{},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\"],\
             \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}}\n",
            gone_pid
        );
        std::fs::write(&new_file, crashed).expect("create");
        std::fs::set_permissions(&new_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::rename(&new_file, &path).expect("recreate");
        h.close_stdin();
        // The holder lost its file to the rename: its watch may say so (or record the loss
        // unprinted, once the holder stopped listening), or, when the release came first, the
        // release does.
        loop {
            let line = h.next_line("holder's release");
            if line == "released" || line.starts_with("lost-before-release") {
                break;
            }
            assert!(line.contains("LockFileReplaced"), "round {round}: {line}");
        }
        let got = w.next_line("waiter");
        assert!(got.starts_with("acquired"), "round {round}: {got}");
        let mut c = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
        let line = c.next_line("newcomer");
        assert!(
            line.starts_with("already-running"),
            "round {round}: two holders: {line}"
        );
        assert_eq!(
            field(&line, "holder_pid"),
            Some(w.pid().to_string().as_str()),
            "round {round}"
        );
    }
}

/// Many waiters, each marking a critical section with an exclusive-create marker file: a second
/// copy inside at the same time makes one exit 99. Release removes the lock file every time, so
/// the remove-while-others-wait hazard is exercised on every hand-over.
#[test]
fn waiters_never_overlap_through_many_hand_overs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker_dir = tempfile::tempdir().expect("tempdir");
    for backend in ["lockfile", "auto"] {
        for round in 0..4 {
            let name = unique_name("overlap");
            let marker = marker_dir.path().join(&name);
            let marker = marker.to_str().expect("utf8");
            let mut copies: Vec<_> = (0..6)
                .map(|_| {
                    holder(
                        None,
                        dir.path(),
                        &[
                            &name,
                            "--backend",
                            backend,
                            "--wait",
                            "forever",
                            "--critical",
                            marker,
                            "--hold-ms",
                            "15",
                            "--go-on-stdin",
                        ],
                    )
                })
                .collect();
            for c in &mut copies {
                c.send("go\n");
            }
            for (i, c) in copies.iter_mut().enumerate() {
                let first = c.next_line("acquired, after waiting its turn");
                assert!(
                    first.starts_with("acquired"),
                    "{backend} round {round} copy {i}: {first}"
                );
                assert_eq!(
                    c.exit_code(),
                    0,
                    "{backend} round {round} copy {i}: {:?}",
                    c.seen
                );
            }
        }
    }
}

#[test]
fn garbage_or_empty_record_still_excludes_and_reports_holder_unknown() {
    let dir = tempfile::tempdir().expect("tempdir");
    for content in [&b"\x00\x01not json at all{{"[..], &b""[..]] {
        let name = unique_name("garbage");
        let mut h = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
        assert!(h.next_line("holder").starts_with("acquired"));
        // Rewrite the content in place (same inode, lock untouched).
        std::fs::write(dir.path().join(format!("{name}.lock")), content).expect("overwrite");
        let mut c = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
        let line = c.next_line("contender");
        assert!(line.starts_with("already-running"), "{line}");
        assert_eq!(field(&line, "holder_pid"), Some("unknown"), "{line}");
        assert!(line.contains("holder unknown"), "{line}");
        assert_eq!(c.exit_code(), 75);
    }
}

/// A lock file lost, seen by each way of watching it: replaced (another file renamed over it),
/// or removed with its directory. (A lock file removed alone is re-created by its holder: see
/// `tests/loss.rs`.)
#[test]
fn recheck_and_watch_report_a_removed_or_replaced_lock_file() {
    let base = tempfile::tempdir().expect("tempdir");
    let modes: [&[&str]; 4] = [
        // The periodic re-check alone (the watch is on by default).
        &["--recheck-ms", "20", "--no-watch"],
        &["--recheck-ms", "20", "--no-watch", "--blocking"],
        // The inotify watch has no timer at all: the change itself wakes it.
        &["--watch"],
        &["--watch", "--blocking"],
    ];
    for (replace, expected) in [(false, "LockFileRemoved"), (true, "LockFileReplaced")] {
        for mode in modes {
            let name = unique_name("recheck");
            let dir = tempfile::tempdir_in(base.path()).expect("tempdir");
            let path = dir.path().join(format!("{name}.lock"));
            let mut args = vec![name.as_str(), "--backend", "lockfile"];
            args.extend_from_slice(mode);
            let mut h = holder(None, dir.path(), &args);
            assert!(h.next_line("holder").starts_with("acquired"));
            if replace {
                // In one step (rename over it): a watch that is quick enough would otherwise
                // see the removal before the new file, and rightly say "removed".
                let other = dir.path().join(format!("{name}.other"));
                std::fs::write(&other, "").expect("write");
                std::fs::rename(&other, &path).expect("replace");
            } else {
                // Stopped meanwhile, so that it cannot re-create the file between the two.
                h.stop();
                std::fs::remove_file(&path).expect("unlink");
                std::fs::remove_dir(dir.path()).expect("rmdir");
                h.signal(rustix::process::Signal::CONT);
            }
            assert_eq!(
                h.line_starting("lost"),
                format!("lost reason={expected} still_exclusive=false"),
                "{mode:?}"
            );
            h.close_stdin();
            assert_eq!(h.exit_code(), 0);
            if replace {
                assert!(
                    path.exists(),
                    "release must not remove a file that is not ours"
                );
            }
        }
    }
}

#[test]
fn explicit_lock_file_path_is_used_as_given() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let path = data_dir.path().join("server.pid");
    let name = unique_name("explicit");
    let guard = InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&path)
        .acquire()
        .expect("acquire");
    assert_eq!(guard.lock_file(), Some(path.as_path()));
    // Auto resolves by who we are: root's lock files follow the system rules.
    let expected_scope = if rustix::process::geteuid().is_root() {
        Scope::System
    } else {
        Scope::User
    };
    assert_eq!(guard.scope(), expected_scope);
    let second = InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&path)
        .acquire();
    match second {
        Err(Error::AlreadyRunning { holder, .. }) => {
            assert_eq!(holder.pid, Some(std::process::id()))
        }
        other => panic!("expected already running, got {other:?}"),
    }
    drop(guard);
    assert!(!path.exists());
}

/// A directory like /run/lock/unique-instance: root's, world-writable, sticky.
fn shared_sticky_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    dir
}

/// Another user's lock file in the shared sticky directory, whose record they wrote to name
/// root's PID 1 as the running copy: the squat is refused as documented, but the refusal and
/// `status` do not name a process the file's owner cannot vouch for (a review: both named PID 1,
/// uid 0). Nor when the record gives the owner's own user with PID 1, which runs as root (a
/// review of that fix), with or without a host name.
#[test]
fn a_record_that_names_another_user_than_the_files_owner_is_not_believed() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs a copy as another user and must run as root (CI does)"
    );
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let forgeries = [
        "\"uid\":0,\"hostname\":null".to_owned(),
        format!("\"uid\":{NOBODY},\"hostname\":null"),
        format!("\"uid\":{NOBODY},\"hostname\":{host:?}"),
    ];
    for forged in forgeries {
        let dir = shared_sticky_dir();
        let name = unique_name("forged_record");
        let mut squatter = holder_as(
            NOBODY,
            NOBODY,
            None,
            dir.path(),
            &[&name, "--backend", "lockfile"],
        );
        squatter.line_starting("acquired");
        let path = dir.path().join(format!("{name}.lock"));
        assert_eq!(std::fs::metadata(&path).expect("meta").uid(), NOBODY);
        // The bytes the squatter may write into its own file (written here by root, in place).
        let record = format!(
            "{{\"pid\":1,{forged},\"start_time\":null,\"backend\":[\"lock-file\"],\"bus\":null,\
             \"bus_unique_name\":null,\"executable\":\"/usr/sbin/my-real-service\"}}\n"
        );
        std::fs::write(&path, record).expect("forge the record");
        match lock_only(&name, dir.path()).acquire() {
            Err(Error::AlreadyRunning { holder, .. }) => {
                assert_eq!((holder.pid, holder.uid), (None, None), "{forged}: {holder}");
            }
            other => panic!("{forged}: the squat should be refused: {other:?}"),
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let status = rt
            .block_on(unique_instance::status(&lock_only(&name, dir.path())))
            .expect("status");
        let holder = status.holder.expect("a holder: the file is held");
        assert_eq!((holder.pid, holder.uid), (None, None), "{forged}: {holder}");
        squatter.close_stdin();
        assert_eq!(squatter.exit_code(), 0);
    }
}

#[test]
fn root_meets_a_service_users_lock_file_in_the_shared_sticky_directory() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs a copy as another user and must run as root (CI does)"
    );
    let dir = shared_sticky_dir();
    let name = unique_name("service_user");
    // The service, running under its own user, holds the instance in system scope.
    let mut service = holder_as(
        NOBODY,
        NOBODY,
        None,
        dir.path(),
        &[&name, "--scope", "system", "--backend", "lockfile"],
    );
    let acquired = service.line_starting("acquired");
    let service_pid = field(&acquired, "pid").expect("pid").to_owned();
    let lock_file = dir.path().join(format!("{name}.lock"));
    assert_eq!(
        std::fs::metadata(&lock_file).expect("meta").uid(),
        NOBODY,
        "the service created its own lock file"
    );
    // A copy started by root is told the service runs, with its PID: not "unsafe lock path".
    match lock_only(&name, dir.path()).acquire() {
        Err(Error::AlreadyRunning { holder, .. }) => {
            assert_eq!(holder.pid.map(|p| p.to_string()), Some(service_pid));
        }
        other => panic!("root's copy should be refused naming the service: {other:?}"),
    }
    // Once the service is gone, root's copy may take the instance.
    service.close_stdin();
    assert_eq!(service.exit_code(), 0);
    let guard = lock_only(&name, dir.path())
        .acquire()
        .expect("free after the service stopped");
    guard.release().expect("release");

    // A crashed service's record there is root's to take over, and to remove.
    std::fs::write(
        &lock_file,
        "{\"pid\":999999,\"uid\":65534,\"start_time\":1,\"backend\":[\"lock-file\"],\
         \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}\n",
    )
    .expect("write");
    let guard = lock_only(&name, dir.path())
        .acquire()
        .expect("root takes over a crashed service's lock file");
    guard.release().expect("release");
    assert!(
        !lock_file.exists(),
        "a crashed holder's file is removed on release"
    );
}

/// A file another user put in the shared sticky directory and nobody holds — planted there, or
/// left by a crashed service — is never kept by root: its owner could rewrite root's record in
/// it, or rename it away (the sticky bit lets the owner), and a third copy would then run. Root
/// removes it (while locked) and makes its own, which that user can neither write nor move.
#[test]
fn root_never_keeps_a_file_another_user_put_in_the_shared_sticky_directory() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test plants a file as another user and must run as root (CI does)"
    );
    let mv = common::require_program("mv", "coreutils");
    let dir = shared_sticky_dir();
    let planted_record = "{\"pid\":999999,\"uid\":65534,\"start_time\":1,\"backend\":[\"lock-file\"],\
         \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}\n";
    for planted in [planted_record, ""] {
        let what = if planted.is_empty() {
            "empty"
        } else {
            "a record"
        };
        let name = unique_name("planted");
        let lock_file = dir.path().join(format!("{name}.lock"));
        std::fs::write(&lock_file, planted).expect("plant");
        std::os::unix::fs::chown(&lock_file, Some(NOBODY), Some(NOBODY)).expect("chown");
        let guard = lock_only(&name, dir.path())
            .acquire()
            .expect("root acquires over a file nobody holds");
        let now = std::fs::metadata(&lock_file).expect("the lock file");
        assert_eq!(now.uid(), 0, "{what}: root kept the planter's file");
        let mut mv_away = std::process::Command::new(&mv);
        mv_away
            .arg(&lock_file)
            .arg(dir.path().join(format!("{name}.gone")));
        let mut as_planter = common::as_user(NOBODY, NOBODY, &mv_away);
        as_planter.stderr(std::process::Stdio::null());
        let moved = common::status_within_timeout(as_planter);
        assert!(
            !moved.success(),
            "{what}: the planter moved root's lock file away"
        );
        assert!(
            lock_only(&name, dir.path()).acquire().is_err(),
            "{what}: a second copy acquired"
        );
        assert!(guard.losses().is_empty(), "{what}: {:?}", guard.losses());
        guard.release().expect("release");
        assert!(
            !lock_file.exists(),
            "{what}: root's own file is removed on release"
        );
    }
}

#[test]
fn other_users_copy_is_told_who_runs_and_cannot_take_a_file_it_may_not_write() {
    let dir = shared_sticky_dir();
    let name = unique_name("other_user");
    let lock_file = dir.path().join(format!("{name}.lock"));
    // Root holds the instance; its lock file is root's, mode 0644.
    let guard = lock_only(&name, dir.path())
        .acquire()
        .expect("root acquires");
    let mut other = holder_as(
        NOBODY,
        NOBODY,
        None,
        dir.path(),
        &[&name, "--scope", "system", "--backend", "lockfile"],
    );
    let refused = other.line_starting("already-running");
    assert_eq!(
        field(&refused, "holder_pid"),
        Some(std::process::id().to_string().as_str()),
        "{refused}"
    );
    assert_eq!(other.exit_code(), 75);
    guard.release().expect("release");

    // A root-owned file nobody holds: the other user cannot become the instance through it,
    // and says so (not "already running"), leaving it as it was.
    std::fs::write(&lock_file, "").expect("write");
    let mut other = holder_as(
        NOBODY,
        NOBODY,
        None,
        dir.path(),
        &[&name, "--scope", "system", "--backend", "lockfile"],
    );
    let refused = other.line_starting("not-permitted");
    assert!(refused.contains("belongs to uid 0"), "{refused}");
    assert_eq!(other.exit_code(), 77);
    assert_eq!(std::fs::metadata(&lock_file).expect("meta").uid(), 0);
}

#[test]
fn a_hard_linked_lock_file_is_refused_and_its_other_name_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("hardlink");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("write");
    std::fs::hard_link(&victim, dir.path().join(format!("{name}.lock"))).expect("link");
    assert_eq!(
        unsafe_problem(lock_only(&name, dir.path()).acquire()),
        UnsafeLockPath::HardLinked { links: 2 }
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n"
    );
}

/// A second name given to a lock file while a copy holds it (a backup tool hard-linking the
/// lock directory, `ln` by hand): a copy started then only reads the file to learn who holds
/// it, which is safe whatever its names, so it is refused naming the holder (75), through the
/// library and `run`, as without the link. It used to fail with "unsafe lock path" (70).
#[test]
fn a_held_lock_file_with_a_second_name_is_already_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("held_linked");
    let path = dir.path().join(format!("{name}.lock"));
    let mut h = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    assert!(h.next_line("holder").starts_with("acquired"));
    let other = dir.path().join(format!("{name}.bak"));
    std::fs::hard_link(&path, &other).expect("link");
    let mut c = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    let line = c.next_line("newcomer");
    assert!(line.starts_with("already-running"), "{line}");
    assert_eq!(
        field(&line, "holder_pid"),
        Some(h.pid().to_string().as_str()),
        "{line}"
    );
    assert_eq!(c.exit_code(), 75);
    let mut run = common::cli(
        None,
        dir.path(),
        &["run", "--backend", "lockfile", &name, "--", "true"],
    );
    assert_eq!(run.exit_code(), 75, "{:?}", run.stderr_until_closed());
    std::fs::remove_file(&other).expect("unlink the second name");
    h.close_stdin();
    assert_eq!(h.line_starting("released"), "released");
    assert_eq!(h.exit_code(), 0);
}

/// Stops a copy when it finds the lock file, held by nobody, with a second name (`attempt.rs`).
const STOP_ON_A_SECOND_NAME: &str = "UNIQUE_INSTANCE_TEST_STOP_ON_A_SECOND_NAME";

/// A second name on a lock file nobody holds, taken away a moment later: a copy that meets it
/// waits for the link to go (a bounded wait on the file's inotify events) and then takes the
/// file, rather than failing with "unsafe lock path" at once. (One that stays is refused: see
/// `a_hard_linked_lock_file_is_refused_and_its_other_name_untouched`.)
#[test]
fn a_second_name_that_goes_away_is_waited_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("transient_link");
    let path = dir.path().join(format!("{name}.lock"));
    // Empty, held by nobody: as a holder killed before it wrote its record leaves it.
    std::fs::write(&path, "").expect("create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let other = dir.path().join(format!("{name}.bak"));
    std::fs::hard_link(&path, &other).expect("link");
    let mut cmd = common::clean_command(&common::example_path("holder"), None, dir.path());
    cmd.args([&name, "--backend", "lockfile"]);
    common::arm_test_hook(&mut cmd, STOP_ON_A_SECOND_NAME);
    let mut c = common::Proc::spawn(cmd);
    // Before the fix it printed "unsafe-lock-path" here instead.
    c.stopped_at(STOP_ON_A_SECOND_NAME);
    std::fs::remove_file(&other).expect("unlink the second name");
    c.signal(rustix::process::Signal::CONT);
    let line = c.next_line("the copy");
    assert!(line.starts_with("acquired"), "{line}");
    c.close_stdin();
    assert_eq!(c.exit_code(), 0);
}

#[test]
fn scope_comes_from_the_environment_unless_the_program_chose_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("scope_env");
    // As another user, Auto is the user scope (mode 0600); UNIQUE_INSTANCE_SCOPE=system makes it
    // the system scope (mode 0644), as a systemd unit sets it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    for (value, mode) in [("", 0o600), ("user", 0o600), ("system", 0o644)] {
        // Held until stdin closes, so the file's mode can be seen: it says which scope's rules
        // made it.
        let mut cmd = common::clean_command(&common::example_path("holder"), None, dir.path());
        cmd.args([name.as_str(), "--backend", "lockfile"])
            .env("UNIQUE_INSTANCE_SCOPE", value);
        let mut copy = common::Proc::spawn(common::as_user(NOBODY, NOBODY, &cmd));
        copy.line_starting("acquired");
        let meta = std::fs::metadata(dir.path().join(format!("{name}.lock"))).expect("meta");
        assert_eq!(meta.mode() & 0o777, mode, "UNIQUE_INSTANCE_SCOPE={value:?}");
        copy.close_stdin();
        assert_eq!(copy.exit_code(), 0);
    }
    // The program's own choice wins over the environment.
    let mut cmd = common::clean_command(&common::example_path("holder"), None, dir.path());
    cmd.args([name.as_str(), "--backend", "lockfile", "--scope", "user"])
        .env("UNIQUE_INSTANCE_SCOPE", "system");
    let mut copy = common::Proc::spawn(common::as_user(NOBODY, NOBODY, &cmd));
    copy.line_starting("acquired");
    let meta = std::fs::metadata(dir.path().join(format!("{name}.lock"))).expect("meta");
    assert_eq!(
        meta.mode() & 0o777,
        0o600,
        "--scope user beats the environment"
    );
    copy.close_stdin();
    assert_eq!(copy.exit_code(), 0);
    // A value it does not understand is refused, not guessed at.
    let mut cmd = common::clean_command(&common::example_path("holder"), None, dir.path());
    cmd.args([name.as_str(), "--backend", "lockfile"])
        .env("UNIQUE_INSTANCE_SCOPE", "machine");
    let mut copy = common::Proc::spawn(cmd);
    let refused = copy.line_starting("invalid-environment");
    assert!(refused.contains("UNIQUE_INSTANCE_SCOPE"), "{refused}");
    assert_eq!(copy.exit_code(), 64);
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

/// `lock_file_holder` answers who holds the lock file, from another process, without taking
/// anything: the holder's PID while it runs, nobody once it is gone (even SIGKILLed, its file
/// left behind), and the next copy then acquires.
#[test]
fn lock_file_holder_names_the_running_copy_and_takes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("holder_query");
    let options = lock_only(&name, dir.path());
    assert_eq!(
        options.lock_file_holder().expect("query"),
        None,
        "no file yet"
    );
    let mut h = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    assert!(h.next_line("holder").starts_with("acquired"));
    for _ in 0..3 {
        let found = options.lock_file_holder().expect("query");
        assert_eq!(found.and_then(|f| f.pid), Some(h.pid()));
    }
    h.sigkill();
    assert!(
        dir.path().join(format!("{name}.lock")).exists(),
        "a killed holder leaves its file"
    );
    assert_eq!(options.lock_file_holder().expect("query"), None);
    let guard = options.acquire().expect("free after the holder died");
    drop(guard);
}

/// A file that was already there empty (`touch keep.flag`, a shared `job.lock` in `flock(1)`
/// style) is never written into nor removed, even after a holder SIGKILLed: the next copy takes
/// it as it is, and releases it as it was, the same file with its owner and mode (reviews: it
/// was removed, and the next one made with a new mode, the group locked out; later, what was
/// written into it while held was emptied by the release). A record that an earlier version
/// wrote into such a file, marked kept (a tab before its JSON), and left there when it was
/// killed, is emptied by the copy that takes the file over, and the file kept all the same.
#[test]
fn a_users_empty_file_survives_a_crashed_holder() {
    for planted in [None, Some("earlier version's record")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = unique_name("keep_crash");
        let path = dir.path().join("keep.flag");
        std::fs::write(&path, b"").expect("touch keep.flag");
        // A mode no lock file of ours is made with (0600, or 0644 for root).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let before = std::fs::metadata(&path).expect("meta");
        let file_arg = path.to_str().expect("UTF-8 path");
        let args = [&name[..], "--backend", "lockfile", "--lock-file", file_arg];
        let mut h = holder(None, dir.path(), &args);
        assert!(h.next_line("holder").starts_with("acquired"));
        h.sigkill();
        let left = std::fs::read(&path).expect("the killed holder's file");
        assert!(left.is_empty(), "a record was written into the user's file");
        if planted.is_some() {
            // The killed holder's, as that version wrote it.
            let record = format!(
                "\t{{\"pid\":{},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\"],\
                 \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}}\n",
                h.pid()
            );
            std::fs::write(&path, record).expect("the earlier version's record");
        }
        // Twice: the copy after the next one must find the file just as the first one did.
        for round in 0..2 {
            let guard = InstanceOptions::new(&name)
                .backend(Backend::LockFile)
                .lock_file(&path)
                .acquire()
                .expect("free after the holder died");
            assert_eq!(
                std::fs::read(&path).expect("read"),
                b"",
                "{planted:?}, round {round}: held"
            );
            guard.release().expect("release");
            common::assert_same_empty_file(&path, &before, &format!("{planted:?}, round {round}"));
        }
    }
}

/// An empty file of this user's at the name a copy derives in its lock directory is a holder's
/// that died before its first record (one made at its name, or one that found no room for it):
/// a lock file of ours, not a user's own. The next holder writes its record into it, so a copy
/// refused is told who runs, and removes it on release. Before: kept as a user's file for good,
/// every refusal from then on "holder unknown".
#[test]
fn an_empty_file_left_in_the_lock_directory_is_a_lock_file_of_ours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("empty_left");
    let path = dir.path().join(format!("{name}.lock"));
    std::fs::write(&path, b"").expect("the dead holder's empty file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut h = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    assert!(h.next_line("holder").starts_with("acquired"));
    common::assert_refused_naming(dir.path(), &name, h.pid(), "the holder of the empty file");
    h.close_stdin();
    assert_eq!(h.next_line("holder's release"), "released");
    assert!(
        !path.exists(),
        "the lock file of ours was left behind on release"
    );
}

/// Takes a read lock (`F_OFD_SETLK`, shared) on the whole of `file`, as anyone who may only read
/// it can: held until `file` is closed.
fn read_lock(file: &std::fs::File) {
    read_lock_waiting(file, false);
}

/// [`read_lock`], waiting for it (`F_OFD_SETLKW`) when `wait`.
fn read_lock_waiting(file: &std::fs::File, wait: bool) {
    common::ofd_lock(file, libc::F_RDLCK, wait);
}

/// The holder example in `dir` with `args`, stopped by the test hook `hook` (an
/// `UNIQUE_INSTANCE_TEST_STOP_*` variable) the first time it gets there.
fn hooked_holder(dir: &Path, args: &[&str], hook: &str) -> Proc {
    let mut cmd = common::clean_command(&common::example_path("holder"), None, dir);
    cmd.args(args);
    common::arm_test_hook(&mut cmd, hook);
    Proc::spawn(cmd)
}

/// `crashed`, a holder of `path` that has just started, SIGKILLed once it has acquired; then
/// its file, left behind, read-locked by this process, as anyone who may read it can: until
/// the file returned is closed.
fn crashed_then_read_locked(mut crashed: Proc, path: &Path) -> std::fs::File {
    let line = crashed.next_line("holder");
    assert!(line.starts_with("acquired"), "{line}");
    crashed.sigkill();
    let squatter = std::fs::File::open(path).expect("open to read");
    read_lock(&squatter);
    squatter
}

/// A lock file of ours that no copy holds (its holder was SIGKILLed), read-locked by someone
/// who may only read it, is no running copy: `status` says so, and the next copy removes it,
/// makes a new file and runs (a review: a local user's read lock on a deployed service's file
/// made every copy say "already running"). So is one its holder left empty (no room for its
/// record, then killed: another review kept a service out so for good). A user's own file
/// given as the lock file, which a copy never removes, is never put aside: the copy is
/// refused, the file left as it is.
#[test]
fn a_read_lock_is_no_running_copy_and_does_not_keep_copies_out() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for (backend, left_empty) in [("lockfile", false), ("auto", false), ("lockfile", true)] {
        let name = unique_name("read_locked");
        let path = lock_dir.path().join(format!("{name}.lock"));
        let crashed = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
        let squatter = crashed_then_read_locked(crashed, &path);
        let squatted = squatter.metadata().expect("metadata").ino();
        if left_empty {
            // As `write_or_unknown` leaves it when the file system is full.
            let file = std::fs::OpenOptions::new().write(true).open(&path);
            file.and_then(|f| f.set_len(0)).expect("empty the record");
        }

        let mut status = common::cli(
            None,
            lock_dir.path(),
            &["status", "--backend", "lockfile", &name],
        );
        let said = status.stdout_until_closed();
        assert_eq!(
            status.exit_code(),
            3,
            "{backend} left_empty={left_empty}: status: {said:?}"
        );

        let mut next = holder(None, lock_dir.path(), &[&name, "--backend", backend]);
        let line = next.next_line("next copy");
        assert!(
            line.starts_with("acquired"),
            "{backend} left_empty={left_empty}: {line}"
        );
        let now = std::fs::metadata(&path).expect("the new lock file");
        assert_ne!(
            now.ino(),
            squatted,
            "{backend} left_empty={left_empty}: the same file"
        );
        next.close_stdin();
        assert_eq!(next.line_starting("released"), "released");
        assert_eq!(next.exit_code(), 0);
    }

    // A file the user made, empty, given as the lock file: locked in place, never removed or
    // replaced, so never put aside either.
    let name = unique_name("read_locked_kept");
    let data = lock_dir.path().join("data.lock");
    std::fs::write(&data, "").expect("the user's file");
    let before = std::fs::metadata(&data).expect("metadata");
    let data_arg = data.to_str().expect("UTF-8");
    let mut first = holder(
        None,
        lock_dir.path(),
        &[&name, "--backend", "lockfile", "--lock-file", data_arg],
    );
    assert!(first.next_line("holder").starts_with("acquired"));
    first.sigkill();
    let squatter = std::fs::File::open(&data).expect("open to read");
    read_lock(&squatter);
    let mut next = holder(
        None,
        lock_dir.path(),
        &[&name, "--backend", "lockfile", "--lock-file", data_arg],
    );
    let line = next.next_line("next copy");
    assert!(!line.starts_with("acquired"), "{line}");
    let after = std::fs::metadata(&data).expect("the user's file is still there");
    assert_eq!(after.ino(), before.ino(), "the user's file was replaced");
}

/// A local user who read-locks every file made in a shared lock directory the moment it is
/// there (an inotify watch, as a review did) keeps no copy out: a new lock file is made with no
/// access for anyone until it is locked, and one read-locked at its name anyway (in a release)
/// is put aside. Before, 299 copies in 300 were told "already running".
#[test]
fn a_user_who_read_locks_every_new_file_keeps_no_copy_out() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs the squatter as another user and must run as root (CI does)"
    );
    let dir = shared_sticky_dir();
    let mut squatter = Proc::spawn(common::as_user(NOBODY, NOBODY, &{
        let mut cmd = Command::new(common::example_path("squatter"));
        cmd.arg(dir.path());
        cmd
    }));
    assert_eq!(squatter.next_line("squatter"), "watching");
    let name = unique_name("squatted");
    for round in 0..20 {
        let mut copy = holder(
            None,
            dir.path(),
            &[&name, "--backend", "lockfile", "--scope", "system"],
        );
        let line = copy.next_line("copy");
        assert!(line.starts_with("acquired"), "round {round}: {line}");
        copy.close_stdin();
        assert_eq!(copy.line_starting("released"), "released", "round {round}");
        assert_eq!(copy.exit_code(), 0);
    }
    squatter.close_stdin();
    assert_eq!(squatter.exit_code(), 0);
}

/// A user's own file given as the lock file in a sticky directory (`--lock-file /tmp/flag`,
/// made empty by that user) is never removed by root, who may not keep it either (its owner
/// could rewrite root's record or move it away): root is refused, and the file is left as it
/// was (a review: root removed it and made its own).
#[test]
fn root_never_removes_a_users_own_file_given_as_the_lock_file() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test makes a file as another user and must run as root (CI does)"
    );
    let dir = shared_sticky_dir();
    let flag = dir.path().join("flag");
    std::fs::write(&flag, "").expect("the user's file");
    std::os::unix::fs::chown(&flag, Some(NOBODY), Some(NOBODY)).expect("chown");
    let before = std::fs::metadata(&flag).expect("metadata");
    let name = unique_name("users_flag");
    let result = InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .scope(Scope::System)
        .lock_file(&flag)
        .acquire();
    assert!(
        matches!(
            result,
            Err(Error::UnsafeLockPath {
                problem: UnsafeLockPath::WrongOwner { .. },
                ..
            })
        ),
        "{result:?}"
    );
    let after = std::fs::metadata(&flag).expect("the user's file is still there");
    assert_eq!(
        (after.ino(), after.uid(), after.len()),
        (before.ino(), NOBODY, 0)
    );
}

/// A copy about to remove a lock file it found read-locked by no copy (stopped just before, at
/// a test hook) never removes it once another copy has taken it meanwhile: the reader gone, a
/// copy locks the same file and runs; the first copy, let go on, is refused naming it, and the
/// copy that runs is told of no loss (a review: an earlier design swapped the file out from
/// under the copy that had just taken it, and both ran).
#[test]
fn a_squatted_file_taken_by_a_copy_meanwhile_is_never_removed() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("squat_taken");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let crashed = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let squatter = crashed_then_read_locked(crashed, &path);
    let mut first = hooked_holder(
        lock_dir.path(),
        &[&name, "--backend", "lockfile"],
        "UNIQUE_INSTANCE_TEST_STOP_BEFORE_REMOVING_SQUATTED",
    );
    first.stopped_at("before removing the squatted file");
    drop(squatter);
    let mut second = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let line = second.next_line("second copy");
    assert!(line.starts_with("acquired"), "{line}");
    let second_pid = second.pid().to_string();
    first.signal(rustix::process::Signal::CONT);
    let refused = first.next_line("first copy");
    assert!(refused.starts_with("already-running"), "{refused}");
    assert_eq!(
        field(&refused, "holder_pid"),
        Some(second_pid.as_str()),
        "{refused}"
    );
    assert_eq!(first.exit_code(), 75);
    // The second copy holds the file at its path, and was told of nothing.
    assert!(path.exists());
    second.close_stdin();
    assert_eq!(second.line_starting(""), "released");
    assert_eq!(second.exit_code(), 0);
}

/// Another user's file planted in the shared sticky directory, which they keep read-locked,
/// does not keep root out: root removes it (under a read lock of its own, so no copy could hold
/// it as it goes) and makes its own (a review: every root copy said "already running").
#[test]
fn root_removes_a_planted_file_kept_read_locked() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test plants a file as another user and must run as root (CI does)"
    );
    let dir = shared_sticky_dir();
    let name = unique_name("planted_read_locked");
    let lock_file = dir.path().join(format!("{name}.lock"));
    std::fs::write(&lock_file, "").expect("plant");
    std::os::unix::fs::chown(&lock_file, Some(NOBODY), Some(NOBODY)).expect("chown");
    let squatter = std::fs::File::open(&lock_file).expect("open to read");
    read_lock(&squatter);
    let guard = lock_only(&name, dir.path())
        .acquire()
        .expect("root acquires over a planted file no copy holds");
    let now = std::fs::metadata(&lock_file).expect("the lock file");
    assert_eq!(now.uid(), 0, "root kept the planter's file");
    guard.release().expect("release");
    assert!(!lock_file.exists());
}

/// A copy that waits, for a user's own file given as the lock file (never removed), goes on
/// waiting while another process keeps it read-locked for a moment after the holder let go (a
/// waiter of another user takes a read lock as the holder leaves), and then takes it (a review:
/// it gave up at once with 69). (Should the waiting copy take the lock before the reader gets
/// its read lock, the reader waits for it in turn: the copy must still run, not give up.)
#[test]
fn a_waiting_copy_waits_out_a_read_lock_on_a_kept_file() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("kept_read_locked");
    let flag = lock_dir.path().join("flag");
    std::fs::write(&flag, "").expect("the user's file");
    let flag_arg = flag.to_str().expect("UTF-8");
    let args = [
        name.as_str(),
        "--backend",
        "lockfile",
        "--lock-file",
        flag_arg,
    ];
    let mut first = holder(None, lock_dir.path(), &args);
    assert!(first.next_line("holder").starts_with("acquired"));
    let mut waiter_cmd =
        common::clean_command(&common::example_path("holder"), None, lock_dir.path());
    waiter_cmd
        .args(args)
        .args(["--wait", "30"])
        .env("RUST_LOG", "info");
    let mut waiter = Proc::spawn(waiter_cmd);
    waiter.stderr_line_containing("waiting for the running copy to exit");
    // A reader that gets its read lock the moment the holder lets go, and keeps it a while:
    // longer than the grace an attempt gives a read lock.
    let reader = std::thread::spawn({
        let flag = flag.clone();
        move || {
            let file = std::fs::File::open(&flag).expect("open to read");
            // Granted once the holder let go.
            read_lock_waiting(&file, true);
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    first.close_stdin();
    assert_eq!(first.line_starting("released"), "released");
    let line = waiter.next_line("waiter");
    assert!(line.starts_with("acquired"), "{line}");
    waiter.close_stdin();
    assert_eq!(waiter.line_starting("released"), "released");
    reader.join().expect("the reader");
    assert!(flag.exists(), "the user's file is never removed");
}

/// A copy that reads a holder's record, without a lock, as the holder rewrites it may see it
/// torn (a longer record written over the first, the file's size not yet updated): not a lock
/// file's content. Once that holder has let go (its file removed with its release) it is no
/// refusal: the copy looks again, and takes the instance (an audit saw "not a lock file", 64,
/// about once in 250 000 acquisitions of four churning copies). Here the copy is stopped (a test
/// hook) just after reading a torn record, while its holder lets go.
#[test]
fn a_record_read_torn_as_its_holder_lets_go_is_no_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("torn_read");
    let path = dir.path().join(format!("{name}.lock"));
    let whole = format!(
        "{{\"pid\":{},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\"],\"bus\":null,\
         \"bus_unique_name\":null,\"executable\":\"/usr/bin/server\",\"hostname\":null}}\n",
        std::process::id()
    );
    std::fs::write(&path, &whole.as_bytes()[..whole.len() / 2]).expect("a torn record");
    let holding = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open as its holder");
    common::ofd_lock(&holding, libc::F_WRLCK, false);
    let mut copy = hooked_holder(
        dir.path(),
        &[&name, "--backend", "lockfile"],
        "UNIQUE_INSTANCE_TEST_STOP_AFTER_READING_FOREIGN_CONTENT",
    );
    copy.stopped_at("after reading the torn record");
    // The holder lets go as a release does: its file removed while it is locked, then unlocked.
    std::fs::remove_file(&path).expect("remove");
    drop(holding);
    copy.signal(rustix::process::Signal::CONT);
    let line = copy.next_line("the copy");
    assert!(line.starts_with("acquired"), "{line}");
    copy.close_stdin();
    assert_eq!(copy.line_starting(""), "released");
    assert_eq!(copy.exit_code(), 0);
}

/// Root removing another user's file that no copy holds from the shared sticky directory (to
/// make its own) is never made to remove another copy's file instead: the file's owner, who may
/// rename their own file there, renames it away just as root has checked that the path names it
/// and is about to unlink it (root stopped there, at a test hook), and a second root copy makes
/// its file at the path meanwhile. A review had two copies run so: the first, let go on,
/// unlinked the second's file and made its own. Now the file is root's before the look, so its
/// former owner cannot move it.
#[test]
fn a_foreign_file_renamed_away_as_root_removes_it_never_costs_another_copy_its_file() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test plants a file as another user and must run as root (CI does)"
    );
    let dir = shared_sticky_dir();
    let name = unique_name("foreign_renamed");
    let lock_file = dir.path().join(format!("{name}.lock"));
    std::fs::write(&lock_file, "").expect("plant");
    std::os::unix::fs::chown(&lock_file, Some(NOBODY), Some(NOBODY)).expect("chown");
    let mut first = hooked_holder(
        dir.path(),
        &[&name, "--backend", "lockfile"],
        "UNIQUE_INSTANCE_TEST_STOP_BEFORE_UNLINKING_UNHELD",
    );
    first.stopped_at("before unlinking the planted file");
    let mut mv = Command::new("mv");
    mv.arg(&lock_file).arg(dir.path().join("moved-away"));
    let moved = common::status_within_timeout(common::as_user(NOBODY, NOBODY, &mv)).success();
    let mut second = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    let second_line = second.next_line("second copy");
    first.signal(rustix::process::Signal::CONT);
    let first_line = first.next_line("first copy");
    assert!(
        !(first_line.starts_with("acquired") && second_line.starts_with("acquired")),
        "two copies run (the planter's rename {}): {first_line} / {second_line}",
        if moved { "succeeded" } else { "failed" }
    );
    assert!(!moved, "the planter moved a file root was removing");
    assert!(first_line.starts_with("acquired"), "{first_line}");
    assert!(second_line.starts_with("already-running"), "{second_line}");
    first.close_stdin();
    assert_eq!(first.line_starting(""), "released");
    assert_eq!(first.exit_code(), 0);
}

/// After a crash, a process that read-locks the lock file left behind and holds the lock
/// directory's `flock` (anyone who may read the directory can: a deployed service's own
/// directory is 0755) does not keep copies out of a directory nobody else may write: removers
/// there are kept one at a time by a lock on a file no other user may open, and the next copy
/// removes the file, makes its own and runs (a review kept a service down so for as long as it
/// liked, every start refused with 69). Twice, the copies a user's (`nobody`, in a directory
/// of its own) under `umask 277`: the remover file made the first time must serve the second
/// (a review: made with the umask's mode, 0400, its owner could not open it again, and every
/// later removal was refused), though it was given a second name elsewhere meanwhile.
#[test]
fn a_read_lock_and_the_directorys_flock_keep_no_copy_out_of_a_private_directory() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs copies as another user and must run as root (CI does)"
    );
    let lock_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(lock_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755");
    std::os::unix::fs::chown(lock_dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    let name = unique_name("flock_squat");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let under_umask = |args: &[&str]| {
        let mut cmd = common::clean_command(&common::example_path("holder"), None, lock_dir.path());
        cmd.args(args);
        let mut sh = Command::new("sh");
        sh.args(["-c", "umask 277; exec \"$0\" \"$@\""]);
        Proc::spawn(common::as_user(NOBODY, NOBODY, &common::wrapped(sh, &cmd)))
    };
    let mut links = Vec::new();
    for round in 0..2 {
        let crashed = under_umask(&[&name, "--backend", "lockfile"]);
        let squatter = crashed_then_read_locked(crashed, &path);
        let squatted = squatter.metadata().expect("metadata").ino();
        let dir = std::fs::File::open(lock_dir.path()).expect("open the directory");
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .expect("the directory's flock");
        let mut next = under_umask(&[&name, "--backend", "lockfile"]);
        let line = next.next_line("next copy");
        assert!(line.starts_with("acquired"), "round {round}: {line}");
        let now = std::fs::metadata(&path).expect("the new lock file");
        assert_ne!(now.ino(), squatted, "round {round}: the same file");
        next.close_stdin();
        assert_eq!(next.line_starting("released"), "released");
        assert_eq!(next.exit_code(), 0);
        // A second name for the remover file, made elsewhere (by anyone, where hard links to
        // others' files are allowed), gives no access to it and keeps no copy out (a review:
        // refused for good, 69).
        let remover = lock_dir.path().join(".unique-instance.remover");
        let elsewhere = tempfile::tempdir_in("/tmp").expect("tempdir");
        std::fs::hard_link(&remover, elsewhere.path().join("link")).expect("hard link");
        links.push(elsewhere);
    }
}

/// Copies that name one lock file two ways — by its lock directory, and by its path
/// (`--lock-file`) — keep removers one at a time with the same lock: the one the directory
/// calls for. A review stopped two such copies just before each removed the same read-locked
/// file (a test hook), each holding a different kind of lock; let go, both ran. Now the second
/// cannot get the lock while the first holds it, and is refused.
#[test]
fn copies_naming_one_file_two_ways_remove_it_one_at_a_time() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("two_ways");
    let path = lock_dir.path().join(format!("{name}.lock"));
    let path_arg = path.to_str().expect("UTF-8 path");
    let crashed = holder(None, lock_dir.path(), &[&name, "--backend", "lockfile"]);
    let _squatter = crashed_then_read_locked(crashed, &path);
    let stopped = |args: &[&str]| {
        hooked_holder(
            lock_dir.path(),
            args,
            "UNIQUE_INSTANCE_TEST_STOP_BEFORE_UNLINKING_UNHELD",
        )
    };
    let mut by_dir = stopped(&[&name, "--backend", "lockfile"]);
    by_dir.stopped_at("before removing the squatted file");
    let mut by_path = stopped(&[&name, "--backend", "lockfile", "--lock-file", path_arg]);
    let refused = by_path.next_line("the copy naming the file by its path");
    assert!(refused.starts_with("no-usable-backend"), "{refused}");
    by_dir.signal(rustix::process::Signal::CONT);
    assert!(by_dir.next_line("the copy").starts_with("acquired"));
    by_dir.close_stdin();
    assert_eq!(by_dir.line_starting("released"), "released");
    assert_eq!(by_dir.exit_code(), 0);
}

/// A bounded wait that ends while no copy holds the lock file, but a reader keeps it from every
/// copy (a user's own file, which copies never remove), says so (69), as a copy that does not
/// wait does: not "timed out waiting for the running copy" (75), naming a copy that is not
/// there while `status` says it is not running (a review).
#[test]
fn a_bounded_wait_kept_out_by_a_reader_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("kept_out_wait");
    let path = dir.path().join("job.lock");
    std::fs::write(&path, "").expect("the user's file");
    let path_arg = path.to_str().expect("UTF-8 path");
    let reader = std::fs::File::open(&path).expect("open to read");
    read_lock(&reader);
    let mut copy = common::cli(
        None,
        dir.path(),
        &[
            "run",
            "--wait=0.3",
            "--backend=lockfile",
            "--lock-file",
            path_arg,
            &name,
            "--",
            "echo",
            "ran",
        ],
    );
    let stderr = copy.stderr_until_closed().join("\n");
    assert_eq!(copy.exit_code(), 69, "{stderr}");
    assert!(stderr.contains("read-locked"), "{stderr}");
    let mut status = common::cli(
        None,
        dir.path(),
        &[
            "status",
            "--backend",
            "lockfile",
            "--lock-file",
            path_arg,
            &name,
        ],
    );
    assert_eq!(status.exit_code(), 3);
    drop(reader);
}
