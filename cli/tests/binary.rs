//! The library's tests (tests/ at the root) spawn this package's binary from the target
//! directory (tests/common's `cli_path`), since cargo tells a package's tests only of its own
//! binaries. This test holds that place to where cargo builds it; being an integration test of
//! this package, it also makes a plain `cargo test` at the root build the binary first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc::channel;
use std::time::Duration;

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_binary_is_where_the_librarys_tests_look_for_it_and_runs() {
    let bin = Path::new(env!("CARGO_BIN_EXE_unique-instance"));
    // This test runs as target/<profile>/deps/binary-HASH; tests/common looks in
    // target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    assert_eq!(
        canonical(bin),
        canonical(&profile_dir.join("unique-instance")),
        "tests/common's cli_path must look where cargo builds the CLI"
    );

    let (tx, rx) = channel();
    let mut cmd = Command::new(bin);
    cmd.arg("--version");
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    let out: Output = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("`unique-instance --version` did not finish within 60 s")
        .expect("run unique-instance --version");
    assert!(out.status.success(), "{out:?}");
    // A build for the test suite (the `test-hooks` feature) says so, and only such a build.
    let hooks = if cfg!(feature = "test-hooks") {
        " (with test hooks)"
    } else {
        ""
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("unique-instance {}{hooks}", env!("CARGO_PKG_VERSION"))
    );
}
