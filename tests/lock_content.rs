//! What is inside a lock file, and who may change it: planted records never crash a copy, and
//! files unique-instance did not create are never written or removed.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).

mod common;

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use common::{cli, holder, unique_name};
use nix::libc;
use unique_instance::{Backend, Error, InstanceOptions};

/// Takes an exclusive OFD lock on `path` through an open file description of this test process,
/// as a hostile holder (any user who can create the file in a shared sticky directory) would.
/// The lock lasts as long as the returned file is open.
fn hold_ofd_lock(path: &Path) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .expect("open the planted file");
    common::ofd_lock(&file, libc::F_WRLCK, false);
    file
}

/// Asserts that a copy on the lock file alone, in `dir`, is refused for `name` with the holder
/// unknown (`why` says what it must not name), and that it exits 75; returns its answer line.
fn assert_refused_holder_unknown(dir: &Path, name: &str, why: &str) -> String {
    let mut copy = holder(None, dir, &[name, "--backend", "lockfile"]);
    let line = copy.next_line("the library's answer");
    assert!(line.starts_with("already-running"), "{why}: {line}");
    assert_eq!(
        common::field(&line, "holder_pid"),
        Some("unknown"),
        "{why}: {line}"
    );
    assert_eq!(copy.exit_code(), 75, "{why}");
    line
}

/// A record in the holder's own format with the given numbers (written as they are, in range or not).
fn record(pid: &str, start_time: &str) -> Vec<u8> {
    format!(
        "{{\"pid\":{pid},\"uid\":0,\"start_time\":{start_time},\"backend\":[\"lock-file\"],\
         \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}}\n"
    )
    .into_bytes()
}

/// Records any user can plant in a shared sticky directory and hold, each of which once crashed
/// (or could crash) every copy that read it. Each must give a plain "already running".
fn nasty_records() -> Vec<(&'static str, Vec<u8>)> {
    let mut deep = vec![b'['; 100_000];
    deep.push(b'\n');
    let mut long_line = br#"{"pid":1,"uid":0,"start_time":1,"hostname":""#.to_vec();
    long_line.extend(std::iter::repeat_n(b'a', 20_000));
    long_line.extend_from_slice(b"\"}\n");
    vec![
        ("start_time u64::MAX", record("4242", "18446744073709551615")),
        ("start_time i64::MAX", record("4242", "9223372036854775807")),
        ("start_time past i64", record("4242", "9223372036854775808")),
        ("start_time negative", record("4242", "-1")),
        ("start_time float", record("4242", "1e300")),
        ("pid past u32", record("4294967296", "1")),
        ("pid zero", record("0", "0")),
        (
            "NUL and escapes in strings",
            br#"{"pid":7,"uid":0,"start_time":1,"backend":["lock-file"],"bus":null,"bus_unique_name":":1.\u0000","executable":"\u0000/bin/\u001b[31mred","hostname":"\n\r\u0000"}
"#
            .to_vec(),
        ),
        ("invalid UTF-8", b"{\"pid\":1,\"uid\":0,\"hostname\":\"\xff\xfe\"}\n".to_vec()),
        ("NUL bytes", b"\0\0\0\0{\"pid\":1}\0\n".to_vec()),
        ("deep nesting", deep),
        ("first line longer than a read", long_line),
    ]
}

/// A planted record (any bytes, any numbers) in a held lock file: `run` and the library answer
/// "already running" (75), `status` "running" (0); none of them panics (101).
#[test]
fn planted_records_never_crash_a_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    // In parallel: a garbled record costs each copy the grace it gives a holder to write one.
    std::thread::scope(|threads| {
        for (case, content) in nasty_records() {
            let dir = dir.path();
            threads.spawn(move || planted_record_case(dir, case, &content));
        }
    });
}

fn planted_record_case(dir: &Path, case: &str, content: &[u8]) {
    let name = unique_name("planted");
    let path = dir.join(format!("{name}.lock"));
    std::fs::write(&path, content).expect("plant the record");
    let _held = hold_ofd_lock(&path);
    for backend in ["lockfile", "auto"] {
        let mut copy = holder(None, dir, &[&name, "--backend", backend]);
        let line = copy.next_line("the library's answer");
        assert!(line.starts_with("already-running"), "{case}: {line}");
        assert_eq!(copy.exit_code(), 75, "{case} ({backend}): {:?}", copy.seen);
    }
    let mut run = cli(None, dir, &["run", &name, "--", "true"]);
    assert_eq!(
        run.exit_code(),
        75,
        "{case}: run: {:?}",
        run.stderr_until_closed()
    );
    for args in [&["status", &name][..], &["status", "--json", &name][..]] {
        let mut status = cli(None, dir, args);
        assert_eq!(
            status.exit_code(),
            0,
            "{case}: {args:?}: {:?} {:?}",
            status.seen,
            status.stderr_until_closed()
        );
    }
    assert_eq!(std::fs::read(&path).expect("read"), content, "{case}");
}

/// A huge (sparse) lock file is read no further than its first block, and still excludes.
#[test]
fn a_huge_held_lock_file_is_not_read_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("huge");
    let path = dir.path().join(format!("{name}.lock"));
    let file = File::create(&path).expect("create");
    file.set_len(1 << 40).expect("a sparse 1 TiB file");
    drop(file);
    let _held = hold_ofd_lock(&path);
    let mut copy = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    let line = copy.next_line("the library's answer");
    assert!(line.starts_with("already-running"), "{line}");
    assert_eq!(copy.exit_code(), 75);
    let mut status = cli(None, dir.path(), &["status", &name]);
    assert_eq!(status.exit_code(), 0, "{:?}", status.stderr_until_closed());
}

/// A guard dropped in a child after `fork` leaves the file and the lock to the process that
/// acquired: the parent still holds, a second copy is refused and names the parent, and the
/// file is there until the parent releases it.
#[test]
fn a_guard_dropped_in_a_forked_child_leaves_the_parent_holding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("fork");
    let path = dir.path().join(format!("{name}.lock"));
    let mut parent = common::Proc::spawn({
        let mut cmd =
            common::clean_command(&common::example_path("fork_release"), None, dir.path());
        cmd.arg(&name);
        cmd
    });
    let acquired = parent.next_line("acquired");
    assert!(acquired.starts_with("acquired"), "{acquired}");
    let dropped = parent.next_line("the child's drop");
    assert_eq!(dropped, "child-dropped status=0");
    assert!(
        path.exists(),
        "the child's drop removed the parent's lock file"
    );
    let mut second = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    let line = second.next_line("the second copy");
    assert!(line.starts_with("already-running"), "{line}");
    assert_eq!(
        common::field(&line, "holder_pid"),
        Some(parent.pid().to_string().as_str()),
        "{line}"
    );
    assert_eq!(second.exit_code(), 75);
    parent.close_stdin();
    assert_eq!(parent.next_line("release"), "released");
    assert_eq!(parent.exit_code(), 0);
    assert!(
        !path.exists(),
        "the acquiring process removes its file on release"
    );
    let mut third = holder(None, dir.path(), &[&name, "--backend", "lockfile"]);
    assert!(third.next_line("the third copy").starts_with("acquired"));
}

/// The inode, size, mode, modification time and bytes of `path`: what must not change.
fn fingerprint(path: &Path) -> (u64, u64, u32, i64, i64, Vec<u8>) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("the file is still there");
    (
        m.ino(),
        m.size(),
        m.mode(),
        m.mtime(),
        m.mtime_nsec(),
        std::fs::read(path).expect("read"),
    )
}

fn refused_as_not_a_lock_file(mut run: common::Proc, what: &str) {
    let stderr = run.stderr_until_closed().join("\n");
    assert_eq!(run.exit_code(), 64, "{what}: {stderr}");
    assert!(
        stderr.contains("is not a lock file")
            && stderr.contains("never writes into or removes a file it did not create"),
        "{what}: {stderr}"
    );
}

/// `run --lock-file ./data.db` and `--lock-file ./backup.sh … -- ./backup.sh` (as people coming
/// from `flock(1)` write them) refuse with exit 64 and leave the file byte-for-byte as it was:
/// a data file, a script about to run, and a script that is running.
#[test]
fn a_file_unique_instance_did_not_create_is_never_written_or_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.db");
    std::fs::write(&data, b"SQLite format 3\0\x10\x00\x01\x01 precious rows\n").expect("data");
    let script = dir.path().join("backup.sh");
    std::fs::write(&script, "#!/bin/sh\necho started\nread line\necho ran\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let (data_before, script_before) = (fingerprint(&data), fingerprint(&script));
    let data_arg = data.to_str().expect("utf-8 path");
    let script_arg = script.to_str().expect("utf-8 path");
    let name = unique_name("notours");

    let run = cli(
        None,
        lock_dir.path(),
        &["run", "--lock-file", data_arg, &name, "--", "true"],
    );
    refused_as_not_a_lock_file(run, "data file");
    let run = cli(
        None,
        lock_dir.path(),
        &["run", "--lock-file", script_arg, &name, "--", script_arg],
    );
    refused_as_not_a_lock_file(run, "script as its own lock");
    let run = cli(
        None,
        lock_dir.path(),
        &[
            "run",
            "--wait=1",
            "--lock-file",
            data_arg,
            &name,
            "--",
            "true",
        ],
    );
    refused_as_not_a_lock_file(run, "data file, waiting");

    // The script, running: it must not be opened for writing (ETXTBSY) nor touched.
    let mut running = common::Proc::spawn(std::process::Command::new(&script));
    assert_eq!(running.next_line("the script's start"), "started");
    let run = cli(
        None,
        lock_dir.path(),
        &["run", "--lock-file", script_arg, &name, "--", "true"],
    );
    refused_as_not_a_lock_file(run, "running script");
    running.send("go\n");
    assert_eq!(running.next_line("the script's end"), "ran");
    assert_eq!(running.exit_code(), 0);

    // The library says the same, and so does `status` (which only reads): a file that is not
    // a lock file is no instance "not running" (that said, a user would be told to start one
    // that `run` then refuses).
    match InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .lock_file(&data)
        .acquire()
    {
        Err(e @ Error::NotALockFile { .. }) => assert_eq!(e.exit_code(), 64),
        other => panic!("expected NotALockFile, got {other:?}"),
    }
    let status = cli(
        None,
        lock_dir.path(),
        &["status", "--lock-file", data_arg, &name],
    );
    refused_as_not_a_lock_file(status, "status of a data file");

    assert_eq!(fingerprint(&data), data_before, "the data file changed");
    assert_eq!(fingerprint(&script), script_before, "the script changed");
}

/// A lock file nobody holds with a second name (a hard link to someone's file) is refused by
/// `status` as `run` refuses it (78, "unsafe lock path"), not reported "not running": `run`
/// would never start there.
#[test]
fn status_refuses_a_hard_linked_file_as_run_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "").expect("write");
    let path = dir.path().join("linked.lock");
    std::fs::hard_link(&victim, &path).expect("link");
    let path_arg = path.to_str().expect("utf-8 path");
    let name = unique_name("status_linked");
    for args in [
        &["run", "--lock-file", path_arg, &name, "--", "true"][..],
        &["status", "--lock-file", path_arg, &name][..],
    ] {
        let mut copy = cli(None, dir.path(), args);
        let stderr = copy.stderr_until_closed().join("\n");
        assert_eq!(copy.exit_code(), 78, "{args:?}: {stderr}");
        assert!(
            stderr.contains("it has 2 names (hard links)"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(std::fs::read(&victim).expect("read"), b"", "left as it was");
}

/// A crashed holder's file (one whole record, nothing else) at an explicit path is taken over
/// and removed on release, as any lock file of ours.
#[test]
fn a_crashed_holders_record_is_taken_over_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("crashed");
    let path = dir.path().join(format!("{name}.lock"));
    std::fs::write(&path, record("999999", "1")).expect("write");
    let path_arg = path.to_str().expect("utf-8 path");
    let mut run = cli(
        None,
        dir.path(),
        &["run", "--lock-file", path_arg, &name, "--", "true"],
    );
    assert_eq!(run.exit_code(), 0, "{:?}", run.stderr_until_closed());
    assert!(
        !path.exists(),
        "a crashed holder's lock file is removed on release"
    );
}

/// A file that was there, empty, before we took it may be someone's flag file (`touch
/// keep.flag`): it is used as the lock (a holder killed before writing its record leaves one,
/// which must not block restarts), but never written into nor removed: released, it is the
/// same file, empty, with its owner and mode. Before: removed on release. (Another user's empty
/// file that root meets in a shared sticky directory is the exception: anyone may have planted
/// it there, so root never keeps it; see `tests/lockfile_safety.rs`.)
#[test]
fn a_pre_existing_empty_file_is_used_but_never_removed() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<(std::path::PathBuf, Option<u32>)> = vec![(dir.path().join("keep.flag"), None)];
    for (path, owner) in files {
        let path_arg = path.to_str().expect("utf-8 path");
        if let Some(uid) = owner {
            let mut touch = std::process::Command::new("touch");
            touch.arg(&path);
            assert!(
                common::status_within_timeout(common::as_user(uid, uid, &touch)).success(),
                "touch as {uid}"
            );
        } else {
            std::fs::write(&path, b"").expect("touch");
        }
        let before = std::fs::metadata(&path).expect("meta");
        let name = unique_name("emptyflag");
        // COMMAND is given the lock's descriptor: that file, with nothing of ours in it.
        let mut run = cli(
            None,
            lock_dir.path(),
            &[
                "run",
                "--lock-file",
                path_arg,
                &name,
                "--",
                "sh",
                "-c",
                "printf '[%s] %s\\n' \"$(cat \"$1\")\" \"$(readlink /proc/self/fd/$UNIQUE_INSTANCE_LOCK_FD)\"",
                "sh",
                path_arg,
            ],
        );
        let stdout = run.stdout_until_closed().join("\n");
        assert_eq!(
            run.exit_code(),
            0,
            "{path_arg}: {:?}",
            run.stderr_until_closed()
        );
        assert_eq!(stdout, format!("[] {path_arg}"), "{path_arg}");
        let after = std::fs::metadata(&path).expect("the file is still there");
        assert_eq!(
            (
                after.ino(),
                after.uid(),
                after.gid(),
                after.mode(),
                after.len()
            ),
            (before.ino(), before.uid(), before.gid(), before.mode(), 0),
            "{path_arg}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"", "{path_arg}");
        // And it is still a lock file: taken again.
        let mut again = cli(
            None,
            lock_dir.path(),
            &["run", "--lock-file", path_arg, &name, "--", "true"],
        );
        assert_eq!(again.exit_code(), 0, "{:?}", again.stderr_until_closed());
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            b"",
            "{path_arg}"
        );
    }
}

/// A file that merely starts like a record is someone's data: a record line followed by more
/// lines, a record with a key no holder writes, a record with no newline. Refused with exit 64
/// before being opened for writing, and left byte-for-byte. Before: taken, truncated, removed.
#[test]
fn a_record_followed_by_anything_is_not_a_lock_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lock_dir = tempfile::tempdir().expect("tempdir");
    let mut with_tail = record("999999", "1");
    with_tail.extend_from_slice(b"DATA\n");
    for (case, content) in [
        (
            "short record, then data",
            b"{\"pid\":1,\"uid\":0,\"backend\":[]}\nDATA\n".to_vec(),
        ),
        ("full record, then data", with_tail),
        (
            "unknown key",
            b"{\"pid\":1,\"uid\":0,\"backend\":[],\"rows\":3}\n".to_vec(),
        ),
        (
            "no newline",
            b"{\"pid\":1,\"uid\":0,\"backend\":[]}".to_vec(),
        ),
    ] {
        let path = dir
            .path()
            .join(format!("jl-{}", case.replace([' ', ','], "-")));
        std::fs::write(&path, &content).expect("write");
        let before = fingerprint(&path);
        let path_arg = path.to_str().expect("utf-8 path");
        let name = unique_name("jl");
        let run = cli(
            None,
            lock_dir.path(),
            &["run", "--lock-file", path_arg, &name, "--", "true"],
        );
        refused_as_not_a_lock_file(run, case);
        assert_eq!(fingerprint(&path), before, "{case}: the file changed");
    }
}

/// A held lock file whose record cannot be read (`pread` fails: here `/proc/PID/mem`, a regular
/// file that fails every read at offset 0 with `EIO`) is still running, holder unknown, and the
/// read error is logged, not taken for an empty record.
#[test]
fn a_record_that_cannot_be_read_is_logged_and_still_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = format!("/proc/{}/mem", std::process::id());
    let _held = hold_ofd_lock(Path::new(&mem));
    let name = unique_name("unreadable");
    let mut status = cli(None, dir.path(), &["status", "--lock-file", &mem, &name]);
    let stdout = status.stdout_until_closed().join("\n");
    let stderr = status.stderr_until_closed().join("\n");
    assert_eq!(status.exit_code(), 0, "{stdout} {stderr}");
    assert!(stdout.contains("holder unknown"), "{stdout}");
    assert!(
        stderr.contains("cannot read the holder record"),
        "the read error is not logged: {stderr}"
    );
}

/// Refused by a holder that has not written its record yet (it has just taken a crashed
/// holder's file over: the record there names a process that is gone), an async acquisition
/// waits for the record without blocking its executor: another task on the same current-thread runtime runs
/// meanwhile (here: it writes the record, which the acquisition then reports). Blocking, the
/// acquisition would give up after its grace first, and report the holder as unknown.
#[test]
fn waiting_for_a_holders_record_does_not_block_the_executor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("grace");
    let path = dir.path().join(format!("{name}.lock"));
    // A crashed holder's record, of a process of this host that is gone, as a copy that has just
    // taken the file over finds it before it writes its own.
    let gone_pid = common::gone_pid();
    let here = rustix::system::uname();
    let dead = format!(
        "{{\"pid\":{},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\"],\"bus\":null,\
         \"bus_unique_name\":null,\"executable\":null,\"hostname\":{:?}}}\n",
        gone_pid,
        here.nodename().to_str().expect("UTF-8 host name")
    );
    std::fs::write(&path, &dead).expect("a crashed holder's record");
    let _held = hold_ofd_lock(&path);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = rt.block_on(async {
        let acquire = InstanceOptions::new(&name)
            .backend(Backend::LockFile)
            .lock_dir(dir.path())
            .watch_lock_file(false)
            .notify_ready(false)
            .acquire_async();
        // Polled only once the acquisition has yielded to the executor.
        // In one `pwrite` over the dead one, padded to its length, as a holder writes.
        let write_record = async {
            use std::os::unix::fs::FileExt;
            // Another host's holder (a made-up PID with no host name is this host's, and gone).
            let mut line = String::from_utf8(record("4242", "1"))
                .expect("UTF-8")
                .replace("\"hostname\":null", "\"hostname\":\"elsewhere.example\"")
                .into_bytes();
            if line.len() < dead.len() {
                line.pop();
                line.resize(dead.len() - 1, b' ');
                line.push(b'\n');
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open the lock file");
            file.write_all_at(&line, 0).expect("write the record");
        };
        let (outcome, ()) = tokio::join!(acquire, write_record);
        outcome
    });
    match outcome {
        Err(Error::AlreadyRunning { holder, .. }) => assert_eq!(holder.pid, Some(4242)),
        other => panic!("expected already running, pid 4242: {other:?}"),
    }
    let mut status = cli(None, dir.path(), &["status", &name]);
    assert_eq!(status.exit_code(), 0);
}

/// A device at the lock path (here `/dev/null`, which only root could plant, but a user can
/// name with `--lock-file`) is refused as not a regular file, by `run` and `status` alike:
/// a clear error, never a panic, and nothing written to it. The exit status is 78
/// (`EX_CONFIG`: a lock path unique-instance refuses), not 70, which says the tool failed.
/// A device is never even opened (a driver may act on an open: arm a watchdog, raise DTR), so
/// `/dev/tty` without a controlling terminal (`setsid`; opening it would fail with `ENXIO`)
/// is named for what it is, a character device.
#[test]
fn a_device_at_the_lock_path_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("device");
    for device in ["/dev/null", "/dev/tty"] {
        for args in [
            &["run", "--lock-file", device, &name, "--", "true"][..],
            &["status", "--lock-file", device, &name][..],
        ] {
            let mut setsid =
                std::process::Command::new(common::require_program("setsid", "util-linux"));
            setsid.arg("--wait");
            let mut copy = common::Proc::spawn(common::wrapped(
                setsid,
                &common::cli_command(None, dir.path(), args),
            ));
            let stderr = copy.stderr_until_closed().join("\n");
            let code = copy.exit_code();
            assert_eq!(code, 78, "{args:?}: {stderr}");
            assert!(
                stderr.contains("it is a character device, not a regular file"),
                "{args:?}: {stderr}"
            );
            // A device is nobody's to remove: the advice is another path, only.
            assert!(!stderr.contains("remove it"), "{args:?}: {stderr}");
        }
    }
}

/// A record naming a process of this host that is gone is a dead holder's, not yet cleared by
/// whoever holds the lock now (or a killed `run` wrapper's whose COMMAND keeps the lock): a
/// refused copy must not name that dead process as the one running. It says "holder unknown"
/// (after the grace a holder gets to write its record), and still refuses.
#[test]
fn a_refusal_never_names_a_process_that_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    // A whole record, and the placeholder a copy writes first (no host name): one killed just
    // after writing it left a record the long soak saw named as the holder, 50 ms after the
    // process was gone, while the copy that took the file over had not replaced it yet.
    for host in [format!("\"{hostname}\""), "null".to_owned()] {
        let dead_pid = common::gone_pid();
        let name = unique_name("dead_pid");
        let path = dir.path().join(format!("{name}.lock"));
        let content = format!(
            "{{\"pid\":{dead_pid},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\"],\
             \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":{host}}}\n"
        );
        std::fs::write(&path, &content).expect("plant the record");
        let _held = hold_ofd_lock(&path);
        assert_refused_holder_unknown(
            dir.path(),
            &name,
            &format!("{host}: a refusal named the dead process {dead_pid}"),
        );
        let mut status = cli(None, dir.path(), &["status", "--json", &name]);
        let out = status.stdout_until_closed().join("\n");
        assert_eq!(status.exit_code(), 0, "{out}");
        assert!(
            !out.contains(&format!("\"pid\":{dead_pid}"))
                && !out.contains(&format!("\"pid\": {dead_pid}")),
            "{host}: status named the dead process {dead_pid}: {out}"
        );
    }
}

/// A record whose PID now belongs to another process (the holder died and the PID was reused)
/// must not make that unrelated process "the one running": the record's start time says which
/// process it names, and a live process that started at another time is not it. The refusal
/// says "holder unknown", and still refuses.
#[test]
fn a_refusal_never_names_a_process_that_reused_the_holders_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Alive for the whole test, and started long after the start time the record gives.
    let mut impostor = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    let reused_pid = impostor.id();
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let name = unique_name("reused_pid");
    let path = dir.path().join(format!("{name}.lock"));
    // One hour after the epoch: no process of this boot started then.
    let content = format!(
        "{{\"pid\":{reused_pid},\"uid\":0,\"start_time\":3600,\"backend\":[\"lock-file\"],\
         \"bus\":null,\"bus_unique_name\":null,\"executable\":null,\"hostname\":\"{hostname}\"}}\n"
    );
    std::fs::write(&path, &content).expect("plant the record");
    let _held = hold_ofd_lock(&path);
    assert_refused_holder_unknown(
        dir.path(),
        &name,
        &format!("a refusal named process {reused_pid}, which only reused the holder's PID"),
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
}

/// The first record a copy writes into a new lock file, before its own (a placeholder), says
/// when the copy started and on which host, as the holder's own does: a copy killed right after
/// writing it leaves a record that tells it from whatever process gets its PID later. Without
/// a start time (a review), such a record was believed as long as any process had that PID:
/// hours later, a refusal named an unrelated process as the one running. Here the copy is
/// SIGKILLed at its second write (strace), leaving its first record at the name; that record
/// with its PID given to PID 1 (alive, started long before) is held, and a refusal must not
/// name PID 1.
#[test]
fn a_first_record_left_by_a_killed_copy_does_not_name_whoever_reuses_its_pid() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let strace = common::require_program("strace", "strace");
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("first_record");
    let path = dir.path().join(format!("{name}.lock"));
    let secs = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs()
    };
    let before = secs();
    let mut cmd = common::clean_command(&strace, None, dir.path());
    cmd.args(["-f", "-o", "/dev/null", "-e", "trace=pwrite64"])
        .args(["-e", "inject=pwrite64:signal=KILL:when=2", "--"])
        .arg(common::example_path("holder"))
        .args([&name, "--backend", "lockfile"]);
    let out = common::output_within_timeout(&mut cmd);
    let after = secs();
    let content = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("the copy killed at its second write left no lock file ({e}): {out:?}")
    });
    let record: serde_json::Value = serde_json::from_str(content.trim_end())
        .unwrap_or_else(|e| panic!("not a record ({e}): {content:?}"));
    assert_eq!(
        record["executable"],
        serde_json::Value::Null,
        "not the first record (the copy was killed later than meant): {content}"
    );
    let start_time = record["start_time"]
        .as_u64()
        .unwrap_or_else(|| panic!("the first record gives no start time: {content}"));
    assert!(
        (before.saturating_sub(5)..=after + 5).contains(&start_time),
        "start time {start_time} is not the copy's ({before}..={after}): {content}"
    );
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        record["hostname"].as_str(),
        Some(hostname.as_str()),
        "{content}"
    );

    // The dead copy's PID, now another process's (PID 1, started long before the copy).
    let pid = record["pid"].as_u64().expect("pid");
    let reused = content.replacen(&format!("\"pid\":{pid},"), "\"pid\":1,", 1);
    assert_ne!(reused, content, "{content}");
    std::fs::write(&path, &reused).expect("give the record's PID to PID 1");
    let _held = hold_ofd_lock(&path);
    assert_refused_holder_unknown(
        dir.path(),
        &name,
        "a refusal named PID 1, which only has the dead copy's PID",
    );
}

/// `record_this_process_as_holder` writes a record only through a descriptor the lock is held
/// through, and only over a holder record (or nothing): a file nobody holds, one held through
/// another open file, or someone's data are left exactly as they were.
#[test]
fn a_record_is_rewritten_only_through_a_held_descriptor() {
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("record_self");
    let path = dir.path().join(format!("{name}.lock"));
    let guard = InstanceOptions::new(name.as_str())
        .backend(Backend::LockFile)
        .lock_dir(dir.path())
        .acquire()
        .expect("acquire");
    let before = std::fs::read(&path).expect("read");
    // Another open file of the held file: the lock is not held through it.
    let other = File::open(&path).expect("open");
    assert!(unique_instance::record_this_process_as_holder(other.as_fd()).is_err());
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "left as it was"
    );
    // Through the guard's own descriptor: written, one whole record naming this process,
    // padded to the old length.
    let fd = guard.lock_file_descriptor().expect("a lock file");
    unique_instance::record_this_process_as_holder(fd).expect("rewrite");
    let after = std::fs::read(&path).expect("read");
    assert!(
        after.len() >= before.len() && after.ends_with(b"\n"),
        "{after:?}"
    );
    let line = String::from_utf8(after).expect("utf-8");
    assert!(
        line.contains(&format!("\"pid\":{}", std::process::id())),
        "{line}"
    );
    assert_eq!(line.matches('\n').count(), 1, "{line}");
    guard.release().expect("release");
    // Nobody holds a file of someone's data: not written.
    std::fs::write(&path, "data\n").expect("write");
    let data = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    assert!(unique_instance::record_this_process_as_holder(data.as_fd()).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), b"data\n");
}

/// A bounded wait ends when it was asked to, even when the holder has written no record (a
/// program that locks the file its own way, a holder that has just locked it): the first
/// attempt's grace for the record (2 s) ran before the wait's deadline applied, so a 100 ms wait
/// took over 2 s. (An upper bound, not a speed goal: the bound checked is the wait broken by
/// 1.5 s, where the fault it guards against always took at least 2 s.)
#[test]
fn a_bounded_wait_is_not_stretched_by_a_holder_without_a_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("held.lock");
    std::fs::write(&path, b"").expect("create");
    let _held = hold_ofd_lock(&path);
    let wait = std::time::Duration::from_millis(100);
    let started = std::time::Instant::now();
    let outcome = InstanceOptions::new(unique_name("bounded"))
        .backend(Backend::LockFile)
        .lock_file(&path)
        .wait(unique_instance::Wait::Timeout(wait))
        .acquire();
    let took = started.elapsed();
    match outcome {
        Err(Error::TimedOut { waited, .. }) => assert_eq!(waited, wait),
        other => panic!("expected a time-out, got {other:?}"),
    }
    assert!(
        took < wait + std::time::Duration::from_millis(1500),
        "a wait of {wait:?} took {took:?}"
    );
}

/// Daemonising after acquiring: the parent leaves, its forked child keeps the guard. Nothing
/// watches in the child (threads are not forked), so `is_exclusive()` looks there itself: once
/// the lock file is removed (and another copy could take a new one), it says false; it said
/// true for ever.
#[test]
fn in_a_forked_child_is_exclusive_looks_at_the_lock_file_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_name("fork_asks");
    let path = dir.path().join(format!("{name}.lock"));
    let mut daemon = common::Proc::spawn({
        let mut cmd =
            common::clean_command(&common::example_path("fork_release"), None, dir.path());
        cmd.args([name.as_str(), "--child-asks"]);
        cmd
    });
    assert!(daemon.next_line("acquired").starts_with("acquired"));
    assert!(daemon.next_line("the fork").starts_with("forked child="));
    daemon.send("ask\n");
    assert_eq!(daemon.next_line("the child's answer"), "exclusive=true");
    std::fs::remove_file(&path).expect("remove the lock file");
    daemon.send("ask\n");
    assert_eq!(daemon.next_line("the child's answer"), "exclusive=false");
    daemon.close_stdin();
    // The child's end: its output closes.
    assert!(daemon.stdout_until_closed().is_empty());
}

/// A file that is not a lock file, planted by another user where the lock file of a name goes
/// in a shared sticky directory, is left as it is, and the refusal says what happened and who
/// can act on it: root gave no path, and was told to "use a path of its own" (a review).
#[test]
fn a_planted_file_at_a_derived_lock_path_is_refused_saying_who_put_it_there() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let name = unique_name("planted");
    let path = dir.path().join(format!("{name}.lock"));
    std::fs::write(&path, b"x").expect("plant");
    std::os::unix::fs::chown(&path, Some(common::NOBODY), Some(common::NOBODY)).expect("chown");
    let before = fingerprint(&path);
    let mut run = cli(None, dir.path(), &["run", "--system", &name, "--", "true"]);
    let stderr = run.stderr_until_closed().join("\n");
    assert_eq!(run.exit_code(), 64, "{stderr}");
    assert!(
        stderr.contains("someone put this file where the lock file goes")
            && stderr.contains("have its owner remove it"),
        "{stderr}"
    );
    assert_eq!(fingerprint(&path), before, "the planted file was changed");
}
