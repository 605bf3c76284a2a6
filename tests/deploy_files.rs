//! The deployment files: the shipped ones are exactly what `unique-instance generate` writes for
//! the example server, and what it writes (for any name, executable and arguments) passes
//! `systemd-analyze verify` and `systemd-tmpfiles` without a single warning.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Proc, example_path, require_program, status_within_timeout};

/// The example server's deployment, as shipped in systemd/ and dbus/.
const EXAMPLE_EXEC: &str = "/usr/local/libexec/unique-instance/example-server";
const EXAMPLE_USER: &str = "example-server";
const EXAMPLE_NAME: &str = "org.example.Server";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `unique-instance ARGS`, run to completion: (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_unique-instance"));
    cmd.args(args).env_remove("UNIQUE_INSTANCE_SCOPE");
    let mut proc = Proc::spawn(cmd);
    let code = proc.exit_code();
    let stdout = proc.stdout_until_closed().join("\n");
    let stderr = proc.stderr_until_closed().join("\n");
    (code, stdout, stderr)
}

/// A root directory with what the generator checks for the example: its user and executable.
fn example_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("etc")).expect("mkdir");
    std::fs::write(
        root.path().join("etc/passwd"),
        format!("{EXAMPLE_USER}:x:999:999::/nonexistent:/usr/sbin/nologin\n"),
    )
    .expect("passwd");
    std::fs::write(
        root.path().join("etc/group"),
        format!("{EXAMPLE_USER}:x:999:\n"),
    )
    .expect("group");
    install_executable(&root.path().join(&EXAMPLE_EXEC[1..]));
    root
}

fn install_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Every file below `dir`, by path relative to it.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).expect("below").to_owned();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn generate_example(out: &Path, root: &Path) -> (i32, String, String) {
    cli(&[
        "generate",
        "--root",
        root.to_str().expect("utf-8"),
        "--out-dir",
        out.to_str().expect("utf-8"),
        "--exec",
        EXAMPLE_EXEC,
        "--user",
        EXAMPLE_USER,
        EXAMPLE_NAME,
        "--",
        EXAMPLE_NAME,
    ])
}

#[test]
fn shipped_files_are_exactly_the_generators_output_for_the_example_server() {
    let root = example_root();
    let out = tempfile::tempdir().expect("tempdir");
    let (code, stdout, stderr) = generate_example(out.path(), root.path());
    assert_eq!(code, 0, "{stderr}");
    let generated = tree(out.path());
    let mut shipped = tree(&repo().join("systemd"))
        .into_iter()
        .map(|(p, c)| (Path::new("systemd").join(p), c))
        .collect::<BTreeMap<_, _>>();
    shipped.extend(
        tree(&repo().join("dbus"))
            .into_iter()
            .map(|(p, c)| (Path::new("dbus").join(p), c)),
    );
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        shipped.keys().collect::<Vec<_>>(),
        "systemd/ and dbus/ hold exactly the generated files"
    );
    for (path, contents) in &generated {
        assert!(
            shipped[path] == *contents,
            "{} differs from the generator's output; regenerate it with the command in its header",
            path.display()
        );
        assert!(
            stdout.contains(&path.display().to_string()),
            "{} not listed: {stdout}",
            path.display()
        );
    }
}

/// `systemd-analyze verify` passes with nothing to say (an unknown key is only a warning, so
/// silence is the test, as well as the exit status).
fn assert_verifies(args: &[&str], env: &[(&str, &Path)]) {
    let analyze = require_program("systemd-analyze", "systemd");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let (stdout, stderr) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut cmd = Command::new(analyze);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("out"))
        .stderr(std::fs::File::create(&stderr).expect("err"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let status = status_within_timeout(cmd);
    let said = std::fs::read_to_string(&stdout).expect("read")
        + &std::fs::read_to_string(&stderr).expect("read");
    assert!(
        status.success() && said.trim().is_empty(),
        "systemd-analyze {args:?}: {status}: {said}"
    );
}

#[test]
fn shipped_system_unit_passes_systemd_analyze_verify() {
    // An image of the installed system: this machine's units (for dbus.socket and the rest),
    // the example's executable, and the shipped unit where the README installs it.
    let root = example_root();
    let units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&units).expect("mkdir");
    let copied = status_within_timeout({
        let mut cp = Command::new("cp");
        cp.arg("-a").arg("/usr/lib/systemd/system").arg(&units);
        cp
    });
    assert!(copied.success(), "cannot copy /usr/lib/systemd/system");
    let installed = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&installed).expect("mkdir");
    std::fs::copy(
        repo().join("systemd/org.example.Server.service"),
        installed.join("org.example.Server.service"),
    )
    .expect("copy");
    let root_arg = format!("--root={}", root.path().display());
    assert_verifies(&["verify", &root_arg, "org.example.Server.service"], &[]);
    // (The shipped user unit is verified where its executable is installed: inside the booted
    // container of tests/nspawn.rs, as the user whose manager runs it.)
}

#[test]
fn generated_units_verify_for_any_name_type_callers_and_arguments() {
    let exec = example_path("server");
    let exec = exec.to_str().expect("utf-8");
    let runtime_dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &["org.example.Plain"],
        &["--type", "notify", "org.example.Notify"],
        &[
            "--callers",
            "root",
            "--unit",
            "acme-daemon",
            "com.acme.Daemon_2-b",
        ],
        &[
            "--callers",
            "group:daemon",
            "--description",
            "100% \"quoted\"",
            "a.b",
        ],
        &[
            "org.example.Args",
            "--",
            "two words",
            "50%",
            "$HOME",
            "quote\"back\\slash",
            "it's",
        ],
    ];
    for case in cases {
        let out = tempfile::tempdir().expect("tempdir");
        let out_arg = out.path().to_str().expect("utf-8");
        let mut args = vec![
            "generate",
            "--out-dir",
            out_arg,
            "--exec",
            exec,
            "--user",
            "daemon",
        ];
        args.extend_from_slice(case);
        let (code, _, stderr) = cli(&args);
        assert_eq!(code, 0, "{case:?}: {stderr}");
        let units: Vec<_> = tree(out.path())
            .into_keys()
            .filter(|p| p.starts_with("systemd") && p.extension() == Some("service".as_ref()))
            .collect();
        assert_eq!(units.len(), 2, "{units:?}");
        for unit in units {
            let path = out.path().join(&unit);
            let path = path.to_str().expect("utf-8");
            if unit.starts_with("systemd/user") {
                assert_verifies(
                    &["--user", "verify", path],
                    &[("XDG_RUNTIME_DIR", runtime_dir.path())],
                );
            } else {
                assert_verifies(&["verify", path], &[]);
            }
        }
    }
}

#[test]
fn generated_command_lines_quote_as_systemd_service_5_says() {
    // Quoted words, `%%` for a literal `%` (specifiers), `$$` for a literal `$` (variables);
    // the verify test above shows systemd parses them without a complaint.
    let out = tempfile::tempdir().expect("tempdir");
    let exec = example_path("server");
    let args = ["two words", "50%", "$HOME", "q\"b\\s", "it's"];
    let mut cli_args = vec![
        "generate",
        "--out-dir",
        out.path().to_str().expect("utf-8"),
        "--exec",
        exec.to_str().expect("utf-8"),
        "--user",
        "daemon",
        "org.example.Argv",
        "--",
    ];
    cli_args.extend(args);
    let (code, _, stderr) = cli(&cli_args);
    assert_eq!(code, 0, "{stderr}");
    let unit = out.path().join("systemd/org.example.Argv.service");
    let contents = std::fs::read_to_string(&unit).expect("read");
    let exec_start = contents
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart=");
    assert_eq!(
        exec_start,
        format!(
            "ExecStart={} \"two words\" 50%% $$HOME \"q\\\"b\\\\s\" \"it's\"",
            exec.display()
        )
    );
}

#[test]
fn tmpfiles_line_makes_the_shared_lock_directory() {
    let tmpfiles = require_program("systemd-tmpfiles", "systemd");
    let root = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(tmpfiles);
    cmd.arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/tmpfiles.d/unique-instance.conf"));
    assert!(status_within_timeout(cmd).success());
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(root.path().join("run/lock/unique-instance")).expect("created");
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o7777, 0o1777);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
}

#[test]
fn generator_refuses_bad_input_naming_the_problem_and_writes_nothing() {
    let root = example_root();
    let root_arg = root.path().to_str().expect("utf-8");
    let not_executable = root.path().join("usr/local/bin/data");
    std::fs::create_dir_all(not_executable.parent().expect("parent")).expect("mkdir");
    std::fs::write(&not_executable, "").expect("write");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--exec", EXAMPLE_EXEC, "--user", EXAMPLE_USER, "org..x"],
            "invalid instance name",
        ),
        (
            &["--exec", EXAMPLE_EXEC, "--user", EXAMPLE_USER, "single"],
            "two",
        ),
        (
            &["--exec", "libexec/server", "--user", EXAMPLE_USER, "a.b"],
            "absolute",
        ),
        (
            &[
                "--exec",
                "/usr/local/bin/missing",
                "--user",
                EXAMPLE_USER,
                "a.b",
            ],
            "No such file",
        ),
        (
            &[
                "--exec",
                "/usr/local/bin/data",
                "--user",
                EXAMPLE_USER,
                "a.b",
            ],
            "not executable",
        ),
        (
            &["--exec", "/usr/local/bin", "--user", EXAMPLE_USER, "a.b"],
            "not a regular file",
        ),
        (
            &["--exec", EXAMPLE_EXEC, "--user", "nosuchuser", "a.b"],
            "DynamicUser",
        ),
        (
            &["--exec", EXAMPLE_EXEC, "--user", "Bad User", "a.b"],
            "not a portable user name",
        ),
        (
            &[
                "--exec",
                EXAMPLE_EXEC,
                "--user",
                EXAMPLE_USER,
                "--callers",
                "group:nogroup",
                "a.b",
            ],
            "does not exist",
        ),
        (
            &[
                "--exec",
                EXAMPLE_EXEC,
                "--user",
                EXAMPLE_USER,
                "--unit",
                "a@b",
                "a.b",
            ],
            "unit name",
        ),
        (
            &[
                "--exec",
                EXAMPLE_EXEC,
                "--user",
                EXAMPLE_USER,
                "--description",
                "two\nlines",
                "a.b",
            ],
            "control character",
        ),
    ];
    for (case, expected) in cases {
        let out = tempfile::tempdir().expect("tempdir");
        let mut args = vec![
            "generate",
            "--root",
            root_arg,
            "--out-dir",
            out.path().to_str().expect("utf-8"),
        ];
        args.extend_from_slice(case);
        let (code, _, stderr) = cli(&args);
        assert_eq!(code, 64, "{case:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{case:?}: {stderr:?} lacks {expected:?}"
        );
        assert!(tree(out.path()).is_empty(), "{case:?} wrote something");
    }
    // A user the root's passwd does not know is looked for there, and the message says where.
    let (_, _, stderr) = cli(&[
        "generate",
        "--root",
        root_arg,
        "--exec",
        EXAMPLE_EXEC,
        "--user",
        "root",
        "a.b",
    ]);
    assert!(stderr.contains("etc/passwd"), "{stderr}");
}

#[test]
fn generator_never_replaces_a_different_file_without_force() {
    let root = example_root();
    let out = tempfile::tempdir().expect("tempdir");
    assert_eq!(generate_example(out.path(), root.path()).0, 0);
    let before = tree(out.path());
    // The same again: every file unchanged.
    let (code, stdout, _) = generate_example(out.path(), root.path());
    assert_eq!(code, 0);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("unchanged"))
            .count(),
        before.len()
    );

    // An edited policy and a removed unit: refused, and nothing at all is written.
    let policy = out.path().join("dbus/org.example.Server.conf");
    std::fs::write(&policy, "my own edits\n").expect("write");
    let unit = out.path().join("systemd/org.example.Server.service");
    std::fs::remove_file(&unit).expect("rm");
    let (code, _, stderr) = generate_example(out.path(), root.path());
    assert_eq!(code, 73, "{stderr}");
    assert!(
        stderr.contains("org.example.Server.conf") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&policy).expect("read"),
        "my own edits\n"
    );
    assert!(!unit.exists(), "written despite the refusal");
    let leftovers: Vec<_> = tree(out.path())
        .into_keys()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // --force: replaced and written, and the result is the generator's output again.
    let root_arg = root.path().to_str().expect("utf-8");
    let out_arg = out.path().to_str().expect("utf-8");
    let (code, stdout, stderr) = cli(&[
        "generate",
        "--force",
        "--root",
        root_arg,
        "--out-dir",
        out_arg,
        "--exec",
        EXAMPLE_EXEC,
        "--user",
        EXAMPLE_USER,
        EXAMPLE_NAME,
        "--",
        EXAMPLE_NAME,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("replaced") && l.contains("org.example.Server.conf")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("wrote") && l.contains("systemd/org.example.Server.service")),
        "{stdout}"
    );
    assert_eq!(tree(out.path()), before);
}
