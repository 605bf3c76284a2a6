//! A full file system (its blocks all used, or a spent quota) stops nothing: a holder record
//! that cannot be written is "holder unknown", as an empty record is, and the lock itself still
//! excludes. Any local user can fill a shared `/run` through `/run/lock` (mode 1777): that must
//! not stop every copy from starting, nor turn a lock file merely removed into a loss. (A file
//! system out of inodes is another matter, which no file can be made on: see the README.)

mod common;

use std::io::Write;
use std::path::Path;

use common::{Proc, cli, holder, unique_name};

/// A tmpfs of one page at `dir` (mode 0700), unmounted when dropped.
struct SmallTmpfs(common::Mounted);

impl SmallTmpfs {
    fn mount(dir: &Path) -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (it mounts a tmpfs of one page to fill it)"
        );
        let mount = common::require_program("mount", "mount");
        std::fs::create_dir(dir).expect("mkdir");
        let mut cmd = std::process::Command::new(mount);
        cmd.args(["-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs"])
            .arg(dir);
        assert!(common::status_within_timeout(cmd).success(), "mount");
        SmallTmpfs(common::Mounted(dir.to_path_buf()))
    }

    /// Fills the file system: a file takes every block left.
    fn fill(&self) {
        let mut filler = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.0.0.join("filler"))
            .expect("filler");
        let chunk = [0u8; 512];
        loop {
            match filler.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                    return;
                }
                Err(e) => panic!("filling the file system: {e}"),
            }
        }
    }
}

/// A copy of `name` started now is refused (its record unknown or naming the holder).
fn assert_refused(name: &str, lock_dir: &Path) {
    let mut other = holder(None, lock_dir, &[name, "--backend", "lockfile"]);
    let line = other.next_line("second copy");
    assert!(line.starts_with("already-running"), "two holders: {line}");
    assert_eq!(other.exit_code(), 75);
}

/// On a full file system the lock is taken all the same, with no record (a warning says so):
/// the library, in both APIs, and `run`. A second copy is refused, and release removes the file.
#[test]
fn a_full_file_system_still_acquires_with_the_holder_unknown() {
    let base = tempfile::tempdir().expect("tempdir");
    let fs = SmallTmpfs::mount(&base.path().join("locks"));
    let lock_dir = fs.0.0.clone();
    fs.fill();
    for mode in [&[][..], &["--blocking"][..]] {
        let name = unique_name("full_acquire");
        let mut args = vec![name.as_str(), "--backend", "lockfile"];
        args.extend_from_slice(mode);
        let mut h = holder(None, &lock_dir, &args);
        let line = h.next_line("holder");
        assert!(
            line.starts_with("acquired"),
            "{mode:?}: {line}; stderr: {:?}",
            h.stderr_lines()
        );
        let warning = h.stderr_line_containing("holder record");
        assert!(warning.contains("holder is unknown"), "{mode:?}: {warning}");
        let path = lock_dir.join(format!("{name}.lock"));
        assert_eq!(
            std::fs::read(&path).expect("the lock file"),
            b"",
            "{mode:?}"
        );
        assert_refused(&name, &lock_dir);
        h.close_stdin();
        assert_eq!(h.stdout_until_closed(), ["released"], "{mode:?}: no loss");
        assert_eq!(h.exit_code(), 0);
        assert!(!path.exists(), "{mode:?}: release removes the file");
    }
    let name = unique_name("full_run");
    let mut run = cli(
        None,
        &lock_dir,
        &["run", "--backend", "lockfile", &name, "--", "true"],
    );
    let code = run.exit_code();
    assert_eq!(code, 0, "run: {:?}", run.stderr_until_closed());
    drop(fs);
}

/// A lock file removed while the file system is full is re-created all the same, with no
/// record: no loss, and a second copy is refused. (The holder is stopped while the file is
/// removed and the file system filled, so that it cannot re-create the file in between.)
#[test]
fn a_lock_file_removed_on_a_full_file_system_is_recreated() {
    let base = tempfile::tempdir().expect("tempdir");
    let fs = SmallTmpfs::mount(&base.path().join("locks"));
    let lock_dir = fs.0.0.clone();
    for mode in [&[][..], &["--blocking"][..]] {
        let name = unique_name("full_recreate");
        let path = lock_dir.join(format!("{name}.lock"));
        let mut args = vec![name.as_str(), "--backend", "lockfile"];
        args.extend_from_slice(mode);
        let mut h: Proc = holder(None, &lock_dir, &args);
        assert!(h.next_line("holder").starts_with("acquired"), "{mode:?}");
        // Stopped once its watch is in place: a removal it did not see happen (before that) is
        // a loss, not a re-creation.
        common::wait_until_watching(h.pid());
        h.stop();
        std::fs::remove_file(&path).expect("remove the lock file");
        fs.fill();
        h.signal(rustix::process::Signal::CONT);
        let warning = h.stderr_line_containing("re-created");
        assert!(warning.contains("removed"), "{mode:?}: {warning}");
        assert_eq!(std::fs::read(&path).expect("re-created"), b"", "{mode:?}");
        assert_refused(&name, &lock_dir);
        h.close_stdin();
        assert_eq!(h.stdout_until_closed(), ["released"], "{mode:?}: no loss");
        assert_eq!(h.exit_code(), 0);
        assert!(!path.exists(), "{mode:?}: release removes the file");
        std::fs::remove_file(lock_dir.join("filler")).expect("empty the file system");
    }
    drop(fs);
}
