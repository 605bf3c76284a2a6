//! Loss is honest: a holder never claims exclusivity that was not verified at that moment, and
//! `run` stops COMMAND once no backend verifiably holds the instance.

mod common;

use std::path::Path;

use common::{BusConfig, DbusDaemon, Proc, cli, field, holder, unique_name};

/// Reads the holder's loss lines until one with `reason`; returns them all.
fn losses_until(h: &mut Proc, reason: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = h.line_starting("lost");
        let done = field(&line, "reason") == Some(reason);
        lines.push(line);
        if done {
            return lines;
        }
    }
}

/// Removes the lock file at `path`, or renames another file over it.
fn remove_or_replace(path: &Path, replace: bool) {
    if replace {
        let other = path.with_extension("other");
        std::fs::write(&other, "").expect("write");
        std::fs::rename(&other, path).expect("rename over the lock file");
    } else {
        std::fs::remove_file(path).expect("remove the lock file");
    }
}

/// The logout case (logind removes the runtime directory, then the session bus dies), with
/// default options: the holder must not say it is still exclusive, because it is not — a copy
/// started now acquires.
#[test]
fn bus_death_after_the_lock_file_was_lost_is_not_exclusive() {
    for replace in [false, true] {
        for mode in [&[][..], &["--blocking"][..]] {
            let mut bus = DbusDaemon::start(BusConfig::Open);
            let lock_dir = tempfile::tempdir().expect("tempdir");
            let name = unique_name("logout");
            let mut args = vec![name.as_str()];
            args.extend_from_slice(mode);
            let mut h = holder(Some(&bus.address), lock_dir.path(), &args);
            let acquired = h.next_line("holder");
            assert!(acquired.contains("LockFile, Dbus"), "{acquired}");
            remove_or_replace(&lock_dir.path().join(format!("{name}.lock")), replace);
            bus.kill();
            let lines = losses_until(&mut h, "BusConnectionClosed");
            for line in &lines {
                assert_eq!(
                    field(line, "still_exclusive"),
                    Some("false"),
                    "replace={replace} {mode:?}: {lines:?}"
                );
            }
            // And that is the truth: a copy (here one without a bus) acquires beside it.
            let mut other = holder(None, lock_dir.path(), &[&name]);
            let line = other.next_line("second copy");
            assert!(line.starts_with("acquired"), "{line}");
            other.close_stdin();
            assert_eq!(other.exit_code(), 0);
            h.close_stdin();
            assert_eq!(h.exit_code(), 0);
        }
    }
}

/// With the watch turned off, nothing sees the lock file go; when the bus dies, the lock file is
/// re-checked right then, and found lost.
#[test]
fn without_the_watch_bus_death_rechecks_the_lock_file_at_that_moment() {
    for replace in [false, true] {
        for mode in [&["--no-watch"][..], &["--no-watch", "--blocking"][..]] {
            let mut bus = DbusDaemon::start(BusConfig::Open);
            let lock_dir = tempfile::tempdir().expect("tempdir");
            let name = unique_name("nowatch");
            let mut args = vec![name.as_str()];
            args.extend_from_slice(mode);
            let mut h = holder(Some(&bus.address), lock_dir.path(), &args);
            assert!(h.next_line("holder").starts_with("acquired"));
            remove_or_replace(&lock_dir.path().join(format!("{name}.lock")), replace);
            bus.kill();
            assert_eq!(
                h.line_starting("lost"),
                "lost reason=BusConnectionClosed still_exclusive=false",
                "replace={replace} {mode:?}"
            );
            h.close_stdin();
            assert_eq!(h.exit_code(), 0);
        }
    }
}

/// A lock directory moved away (or replaced) is a loss: the path no longer leads to our file,
/// and a copy started now makes a new directory and a new lock file.
#[test]
fn lock_directory_moved_away_is_a_loss() {
    let base = tempfile::tempdir().expect("tempdir");
    let modes: [&[&str]; 4] = [
        &["--backend", "lockfile"],
        &["--backend", "lockfile", "--blocking"],
        // The periodic re-check alone sees it too.
        &["--backend", "lockfile", "--no-watch", "--recheck-ms", "20"],
        &[
            "--backend",
            "lockfile",
            "--no-watch",
            "--recheck-ms",
            "20",
            "--blocking",
        ],
    ];
    for (i, mode) in modes.iter().enumerate() {
        for replace_dir in [false, true] {
            let lock_dir = base.path().join(format!("locks{i}{replace_dir}"));
            std::fs::create_dir(&lock_dir).expect("mkdir");
            let name = unique_name("dirgone");
            let mut args = vec![name.as_str()];
            args.extend_from_slice(mode);
            let mut h = holder(None, &lock_dir, &args);
            assert!(h.next_line("holder").starts_with("acquired"));
            let moved = base.path().join(format!("moved{i}{replace_dir}"));
            std::fs::rename(&lock_dir, &moved).expect("move the lock directory away");
            if replace_dir {
                std::fs::create_dir(&lock_dir).expect("mkdir");
            }
            assert_eq!(
                h.line_starting("lost"),
                "lost reason=LockDirectoryRemoved still_exclusive=false",
                "{mode:?} replace_dir={replace_dir}"
            );
            // A copy started now does not see the holder.
            let mut other = holder(None, &lock_dir, &[&name, "--backend", "lockfile"]);
            let line = other.next_line("second copy");
            assert!(line.starts_with("acquired"), "{line}");
            other.close_stdin();
            assert_eq!(other.exit_code(), 0);
            h.close_stdin();
            assert_eq!(h.exit_code(), 0);
        }
    }
}

/// A holder whose lock directory was moved away, and whose bus then dies: not exclusive.
#[test]
fn bus_death_after_the_lock_directory_moved_is_not_exclusive() {
    for mode in [&["--no-watch"][..], &[][..]] {
        let base = tempfile::tempdir().expect("tempdir");
        let lock_dir = base.path().join("locks");
        std::fs::create_dir(&lock_dir).expect("mkdir");
        let mut bus = DbusDaemon::start(BusConfig::Open);
        let name = unique_name("dirbus");
        let mut args = vec![name.as_str()];
        args.extend_from_slice(mode);
        let mut h = holder(Some(&bus.address), &lock_dir, &args);
        assert!(h.next_line("holder").starts_with("acquired"));
        std::fs::rename(&lock_dir, base.path().join("moved")).expect("move");
        bus.kill();
        let lines = losses_until(&mut h, "BusConnectionClosed");
        for line in &lines {
            assert_eq!(
                field(line, "still_exclusive"),
                Some("false"),
                "{mode:?}: {lines:?}"
            );
        }
        h.close_stdin();
        assert_eq!(h.exit_code(), 0);
    }
}

/// A plain acquisition and release with the default watch reports no loss: the guard's own
/// removal of its lock file on release is not someone else's.
#[test]
fn release_is_not_reported_as_a_loss() {
    let lock_dir = tempfile::tempdir().expect("tempdir");
    for mode in [&[][..], &["--blocking"][..]] {
        for backend in ["lockfile", "auto"] {
            let name = unique_name("noloss");
            let mut args = vec![name.as_str(), "--backend", backend];
            args.extend_from_slice(mode);
            let mut h = holder(None, lock_dir.path(), &args);
            assert!(h.next_line("holder").starts_with("acquired"));
            h.close_stdin();
            let rest = h.stdout_until_closed();
            assert_eq!(rest, ["released"], "{backend} {mode:?}");
            assert_eq!(h.exit_code(), 0);
        }
    }
}

/// `run`: the bus dies (tolerated: the lock file still excludes), then the lock file or its
/// directory goes: nothing holds the instance any more, so COMMAND is stopped (exit 69).
#[test]
fn run_stops_command_when_the_second_backend_goes_too() {
    let script = "trap 'echo got-TERM; exit 0' TERM; echo ready; \
                  sleep 60 </dev/null >/dev/null 2>&1 & wait";
    for what in ["file", "directory"] {
        let base = tempfile::tempdir().expect("tempdir");
        let lock_dir = base.path().join("locks");
        std::fs::create_dir(&lock_dir).expect("mkdir");
        let mut bus = DbusDaemon::start(BusConfig::Open);
        let name = unique_name("run_both");
        let mut wrapper = cli(
            Some(&bus.address),
            &lock_dir,
            &["run", &name, "--", "sh", "-c", script],
        );
        assert_eq!(wrapper.next_line("ready"), "ready");
        bus.kill();
        wrapper.stderr_line_containing("COMMAND goes on");
        match what {
            "file" => std::fs::remove_file(lock_dir.join(format!("{name}.lock")))
                .expect("remove the lock file"),
            _ => std::fs::rename(&lock_dir, base.path().join("moved")).expect("move"),
        }
        assert_eq!(
            wrapper.next_line("COMMAND told to stop"),
            "got-TERM",
            "{what}"
        );
        assert_eq!(wrapper.exit_code(), 69, "{what}");
        let stderr = wrapper.stderr_until_closed().join("\n");
        assert!(
            stderr.contains("stopped because the instance was lost"),
            "{what}: {stderr}"
        );
    }
}

/// Unmounts what it names when dropped, so a failing test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let umount = common::require_program("umount", "mount");
        let _ = common::status_within_timeout({
            let mut cmd = std::process::Command::new(umount);
            cmd.arg(&self.0);
            cmd
        });
    }
}

/// A file system mounted over the lock directory: the path leads into another, empty directory
/// (a copy started now acquires there), and inotify on the covered directory sees nothing. The
/// mount table is watched too.
#[test]
fn a_mount_over_the_lock_directory_is_a_loss() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it mounts a tmpfs over a lock directory)"
    );
    let mount = common::require_program("mount", "mount");
    for mode in [&[][..], &["--blocking"][..]] {
        let base = tempfile::tempdir().expect("tempdir");
        let lock_dir = base.path().join("locks");
        std::fs::create_dir(&lock_dir).expect("mkdir");
        let name = unique_name("mounted");
        let mut args = vec![name.as_str(), "--backend", "lockfile"];
        args.extend_from_slice(mode);
        let mut h = holder(None, &lock_dir, &args);
        assert!(h.next_line("holder").starts_with("acquired"));
        let mut cmd = std::process::Command::new(&mount);
        cmd.args(["-t", "tmpfs", "tmpfs"]).arg(&lock_dir);
        assert!(common::status_within_timeout(cmd).success(), "mount");
        let mounted = Mounted(lock_dir.clone());
        assert_eq!(
            h.line_starting("lost"),
            "lost reason=LockDirectoryRemoved still_exclusive=false",
            "{mode:?}"
        );
        h.close_stdin();
        assert_eq!(h.exit_code(), 0);
        drop(mounted);
    }
}

/// Renaming a directory *above* the lock directory (`mv app app.old && mv app.new app`, the
/// usual deploy) leads the path to another file without touching the lock directory itself:
/// the watching holder must notice, because a copy started now acquires beside it.
#[test]
fn an_ancestor_directory_moved_away_is_a_loss() {
    let base = tempfile::tempdir().expect("tempdir");
    for (i, blocking) in [false, true].into_iter().enumerate() {
        let app = base.path().join(format!("app{i}"));
        let lock_dir = app.join("data");
        std::fs::create_dir_all(&lock_dir).expect("mkdir");
        let name = unique_name("ancestor");
        let mut args = vec![name.as_str(), "--backend", "lockfile"];
        if blocking {
            args.push("--blocking");
        }
        // In a mount namespace of its own, so that nothing mounted elsewhere on this machine
        // meanwhile (which wakes the watch's mount-table check) can make up for a missed event.
        let inner = common::clean_command(&common::example_path("holder"), None, &lock_dir);
        let mut cmd = std::process::Command::new(common::require_program("unshare", "util-linux"));
        cmd.args(["--mount", "--propagation", "private", "--"])
            .arg(inner.get_program())
            .args(&args)
            .env_clear();
        for (key, value) in inner.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        let mut h = common::Proc::spawn(cmd);
        assert!(h.next_line("holder").starts_with("acquired"));
        std::fs::rename(&app, base.path().join(format!("app{i}.old"))).expect("mv app");
        std::fs::create_dir_all(&lock_dir).expect("a new app/data");
        assert_eq!(
            h.line_starting("lost"),
            "lost reason=LockDirectoryRemoved still_exclusive=false",
            "blocking={blocking}"
        );
        h.close_stdin();
        assert_eq!(h.exit_code(), 0);
    }
}
