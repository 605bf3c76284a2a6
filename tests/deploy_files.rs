//! The deployment files: the shipped ones are exactly what `unique-instance generate` writes for
//! the example server, and what it writes (for any name, executable and arguments) passes
//! `systemd-analyze verify` and `systemd-tmpfiles` without a single warning.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).

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
    let mut cmd = Command::new(common::cli_path());
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
fn tmpfiles_lines_make_the_services_own_lock_directory_and_the_shared_one() {
    use std::os::unix::fs::MetadataExt;
    let tmpfiles = require_program("systemd-tmpfiles", "systemd");
    // An image with the service's user (systemd-tmpfiles resolves users inside --root).
    let root = example_root();
    let mut cmd = Command::new(tmpfiles);
    cmd.arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join(format!("systemd/tmpfiles.d/{EXAMPLE_NAME}.conf")))
        .stdin(Stdio::null());
    assert!(status_within_timeout(cmd).success());
    let dir = |path: &str| {
        let meta = std::fs::symlink_metadata(root.path().join(path)).expect(path);
        assert!(meta.is_dir(), "{path}");
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    };
    // Only root can make a directory in /run/unique-instance, and only the service's user and
    // root can write in the service's: no other user can create its lock file first.
    assert_eq!(dir("run/unique-instance"), (0o755, 0, 0));
    assert_eq!(
        dir(&format!("run/unique-instance/{EXAMPLE_NAME}")),
        (0o755, 999, 999)
    );
    assert_eq!(dir("run/lock/unique-instance"), (0o1777, 0, 0));
}

#[test]
fn generator_refuses_bad_input_naming_the_problem_and_writes_nothing() {
    let root = example_root();
    let root_arg = root.path().to_str().expect("utf-8");
    let not_executable = root.path().join("usr/local/bin/data");
    std::fs::create_dir_all(not_executable.parent().expect("parent")).expect("mkdir");
    std::fs::write(&not_executable, "").expect("write");
    // A valid name (255 characters at most) too long for its activation file's name.
    let too_long = format!("a.{}", "b".repeat(246));
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
        (
            &[
                "--exec",
                EXAMPLE_EXEC,
                "--user",
                EXAMPLE_USER,
                "--description",
                "swallows the next line\\",
                "a.b",
            ],
            "line continuation",
        ),
        (
            &[
                "--exec",
                EXAMPLE_EXEC,
                "--user",
                EXAMPLE_USER,
                "--description",
                " stripped",
                "a.b",
            ],
            "systemd strips",
        ),
        (
            &["--exec", EXAMPLE_EXEC, "--user", EXAMPLE_USER, &too_long],
            "at most 247",
        ),
        (
            &[
                "--exec",
                "/usr/local/bin/it's",
                "--user",
                EXAMPLE_USER,
                "a.b",
            ],
            "systemd does not accept",
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

/// An executable at an awkward path that records how it was started: its argv, NUL-separated,
/// into `PATH.argv` (a FIFO the test reads: its end is the signal that the program ran).
fn install_recorder(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        path,
        "#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\" > \"$0.argv\"\n",
    )
    .expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A FIFO at `exec`'s `PATH.argv`, read on a thread that sends what the recorder wrote into
/// it (`Ok`) on `tx`.
fn read_recording(exec: &Path, tx: std::sync::mpsc::Sender<Result<Vec<u8>, String>>) -> PathBuf {
    let fifo = PathBuf::from(format!("{}.argv", exec.display()));
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let path = fifo.clone();
    std::thread::spawn(move || {
        // Opening blocks until the recorder opens it to write; the end of it is its exit.
        let _ = tx.send(std::fs::read(&path).map_err(|e| format!("reading the FIFO: {e}")));
    });
    fifo
}

/// Whether a real dbus-daemon loads `policy`: a bus whose configuration includes it must start
/// (with `<include>` a policy it cannot parse stops it; in a system bus's `<includedir>` the
/// file would be skipped with a warning, and the service refused the name: exit 77).
fn assert_policy_loads(policy: &Path) {
    let daemon = require_program("dbus-daemon", "dbus");
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><deny own="*"/></policy>
  <include>{}</include>
</busconfig>
"#,
            dir.path().join("bus").display(),
            policy.display()
        ),
    )
    .expect("write");
    let mut cmd = Command::new(daemon);
    cmd.arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address=1"]);
    let mut bus = Proc::spawn(cmd);
    // It prints its address once it has loaded its configuration and listens; a policy it
    // refuses makes it exit first, saying why on stderr.
    let address = bus.try_line(common::TIMEOUT);
    bus.sigkill();
    assert!(
        address.is_some_and(|a| a.starts_with("unix:")),
        "dbus-daemon refused {}: {:?}\n{}",
        policy.display(),
        bus.stderr_until_closed(),
        std::fs::read_to_string(policy).expect("read")
    );
}

/// What systemd itself reads from `unit` (a file named like the unit): its description and
/// its main command line (argv, as the service would be started: `$$` is `$`). From the dump
/// of a user manager's `--test` mode, which loads units as the real manager does and runs
/// nothing; a user manager refuses to run as root, so as nobody then.
fn systemd_reads(unit: &Path) -> (String, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let systemd = Path::new("/usr/lib/systemd/systemd");
    assert!(
        systemd.is_file(),
        "{} is missing: install it with `apt-get install -y systemd` (the test does not skip)",
        systemd.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let units = dir.path().join("units");
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&units).expect("mkdir");
    std::fs::create_dir(&runtime).expect("mkdir");
    let unit_name = unit
        .file_name()
        .expect("file name")
        .to_str()
        .expect("utf-8");
    std::fs::copy(unit, units.join(unit_name)).expect("copy");
    let mut cmd = Command::new(systemd);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &runtime)
        .env("XDG_RUNTIME_DIR", &runtime)
        // Ours first, then the usual user unit directories (for basic.target and the like).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .args(["--test", "--user", "--no-pager"])
        .arg(format!("--unit={unit_name}"));
    let mut dump = if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&runtime, Some(common::NOBODY), Some(common::NOBODY))
            .expect("chown");
        Proc::spawn(common::as_user(common::NOBODY, common::NOBODY, &cmd))
    } else {
        Proc::spawn(cmd)
    };
    let lines = dump.stdout_until_closed();
    assert_eq!(dump.exit_code(), 0, "{:?}", dump.stderr_until_closed());
    let block: Vec<&str> = lines
        .iter()
        .skip_while(|l| l.trim() != format!("-> Unit {unit_name}:"))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("-> Unit "))
        .map(String::as_str)
        .collect();
    let value = |key: &str| {
        block
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} for {unit_name} in: {block:?}"))
            .to_owned()
    };
    let description = value("Description: ");
    let exec_start = block
        .iter()
        .skip_while(|l| l.trim() != "-> ExecStart:")
        .find_map(|l| l.trim_start().strip_prefix("Command Line: "))
        .unwrap_or_else(|| panic!("no ExecStart for {unit_name}: {block:?}"));
    (description, dumped_command_line(exec_start))
}

/// Splits a command line as systemd dumps it: words separated by spaces, a word that needs it
/// in double quotes with `\` before `"`, `\`, `` ` `` and `$`. Then `$$` becomes `$`, as when
/// the command is started.
fn dumped_command_line(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' => continue,
            '"' => {
                let mut word = String::new();
                loop {
                    match chars.next().expect("closing quote") {
                        '"' => break,
                        '\\' => word.push(chars.next().expect("escaped character")),
                        c => word.push(c),
                    }
                }
                words.push(word);
            }
            c => {
                let mut word = String::from(c);
                while let Some(&c) = chars.peek().filter(|c| **c != ' ') {
                    word.push(c);
                    chars.next();
                }
                words.push(word);
            }
        }
    }
    words.into_iter().map(|w| w.replace("$$", "$")).collect()
}

/// How dbus-daemon starts `name` from the session activation file in `services` when no
/// systemd is there: its `Exec=`, parsed by the daemon and run. The recorder at `exec` writes
/// its argv down and exits (so the activation itself never completes, which does not matter).
fn dbus_daemon_starts(services: &Path, name: &str, exec: &Path) -> Vec<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let bus = common::DbusDaemon::start_with(
        common::BusConfig::Open,
        &format!("<servicedir>{}</servicedir>", services.display()),
    );
    // Whichever comes first: the recording, or the end of the call (then it says why).
    let (tx, rx) = std::sync::mpsc::channel();
    let fifo = read_recording(exec, tx.clone());
    let mut call = Command::new(require_program("busctl", "systemd"));
    call.arg(format!("--address={}", bus.address))
        .args(["call", name, "/", "org.example.Probe", "Probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let call = call.spawn().expect("spawn busctl");
    // (The call waits for a name the recorder never takes; it ends when the bus is dropped.)
    std::thread::spawn(move || {
        let said = call.wait_with_output().map_or_else(
            |e| e.to_string(),
            |o| String::from_utf8_lossy(&o.stderr).into_owned(),
        );
        let _ = tx.send(Err(format!("busctl ended first: {said}")));
    });
    let recorded = rx
        .recv_timeout(common::TIMEOUT)
        .map_err(|_| format!("nothing within {:?}", common::TIMEOUT))
        .and_then(|r| r);
    let recorded = recorded.unwrap_or_else(|why| {
        // Unblock the reader (a writer may open a FIFO someone reads without waiting).
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&fifo);
        panic!(
            "dbus-daemon did not start {}: {why}; the file:\n{}",
            exec.display(),
            std::fs::read_to_string(services.join(format!("{name}.service"))).expect("read")
        )
    });
    drop(bus);
    let mut argv: Vec<String> = recorded
        .split(|b| *b == 0)
        .map(|w| String::from_utf8(w.to_vec()).expect("utf-8"))
        .collect();
    assert_eq!(argv.pop().as_deref(), Some(""), "NUL-terminated");
    argv
}

#[test]
fn generated_files_load_as_written_for_awkward_but_valid_input() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Every character the files' syntaxes treat specially, in the executable's path too (but
    // quotes, backslashes and `$`, which systemd does not take there: refused, see below).
    let exec = base
        .path()
        .join("dir with space/50%h;/ü--x #1/<!-- &amp; -->/(a)*?`~{b}/server");
    install_recorder(&exec);
    let exec_arg = exec.to_str().expect("utf-8");
    let args = [
        "two words",
        "50%",
        "%h",
        "$HOME",
        "${X}",
        "q\"b\\s",
        "it's",
        ";",
        "\\;",
        "--",
        "-x",
        "",
        " lead",
        "trail\\",
        "ü €",
        "#hash",
        "a=b",
        "<!-- -->",
        "&amp;",
    ];
    let long_name = format!("a--b.{}-", "c".repeat(241));
    assert_eq!(long_name.len(), 247, "the longest deployable name");
    let description = "100% \"q\" it's $HOME \\n \\ -- <!-- --> & ü";
    let cases: Vec<(Vec<&str>, &str, String)> = vec![
        (
            vec!["--unit", "x--y-", "--description", description],
            "a--b.c-",
            description.to_owned(),
        ),
        (
            vec!["--type", "notify", "--callers", "root"],
            &long_name,
            format!("{long_name}, a single instance"),
        ),
    ];
    let runtime_dir = tempfile::tempdir().expect("tempdir");
    for (extra, name, expected_description) in &cases {
        let out = tempfile::tempdir().expect("tempdir");
        let mut cli_args = vec![
            "generate",
            "--out-dir",
            out.path().to_str().expect("utf-8"),
            "--exec",
            exec_arg,
            "--user",
            "daemon",
        ];
        cli_args.extend(extra);
        cli_args.push(name);
        cli_args.push("--");
        cli_args.extend(args);
        let (code, _, stderr) = cli(&cli_args);
        assert_eq!(code, 0, "{extra:?} {name}: {stderr}");
        let unit = extra
            .iter()
            .position(|a| *a == "--unit")
            .map_or(*name, |i| extra[i + 1]);
        let expected_argv: Vec<String> = std::iter::once(exec_arg)
            .chain(args)
            .map(str::to_owned)
            .collect();

        // The policy: a real dbus-daemon loads it.
        assert_policy_loads(&out.path().join(format!("dbus/{name}.conf")));

        // The units: systemd-analyze has nothing to say, and systemd reads what was given.
        let system = out.path().join(format!("systemd/{unit}.service"));
        let user = out.path().join(format!("systemd/user/{unit}.service"));
        assert_verifies(&["verify", system.to_str().expect("utf-8")], &[]);
        assert_verifies(
            &["--user", "verify", user.to_str().expect("utf-8")],
            &[("XDG_RUNTIME_DIR", runtime_dir.path())],
        );
        let (read_description, argv) = systemd_reads(&system);
        assert_eq!(&read_description, expected_description, "{unit}");
        assert_eq!(argv, expected_argv, "{unit}: ExecStart");
        let (read_description, argv) = systemd_reads(&user);
        assert_eq!(
            read_description,
            format!("{expected_description} (per user)")
        );
        assert_eq!(argv, expected_argv, "{unit}: the user unit's ExecStart");

        // The tmpfiles.d file: systemd-tmpfiles makes the service's lock directory, silently.
        let image = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(image.path().join("etc")).expect("mkdir");
        std::fs::write(
            image.path().join("etc/passwd"),
            "daemon:x:1:1::/:/bin/false\n",
        )
        .expect("passwd");
        std::fs::write(image.path().join("etc/group"), "daemon:x:1:\n").expect("group");
        let mut tmpfiles = Command::new(require_program("systemd-tmpfiles", "systemd"));
        tmpfiles
            .arg("--create")
            .arg(format!("--root={}", image.path().display()))
            .arg(out.path().join(format!("systemd/tmpfiles.d/{name}.conf")));
        let mut tmpfiles = Proc::spawn(tmpfiles);
        assert_eq!(
            tmpfiles.exit_code(),
            0,
            "{:?}",
            tmpfiles.stderr_until_closed()
        );
        assert_eq!(tmpfiles.stderr_until_closed(), Vec::<String>::new());
        assert!(
            image
                .path()
                .join(format!("run/unique-instance/{name}"))
                .is_dir()
        );

        // The session activation file: dbus-daemon runs exactly that command.
        assert_eq!(
            dbus_daemon_starts(&out.path().join("dbus/services"), name, &exec),
            expected_argv
        );
    }
}

#[test]
fn policy_for_a_group_with_dashes_loads() {
    // `--callers group:GROUP`, for a group only an image has (checked in its etc/group).
    let root = example_root();
    append_line(&root.path().join("etc/group"), "x--y-:x:4000:\n");
    let out = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = cli(&[
        "generate",
        "--root",
        root.path().to_str().expect("utf-8"),
        "--out-dir",
        out.path().to_str().expect("utf-8"),
        "--exec",
        EXAMPLE_EXEC,
        "--user",
        EXAMPLE_USER,
        "--callers",
        "group:x--y-",
        "--unit",
        "u--v-",
        "p--q.r-",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let policy = out.path().join("dbus/p--q.r-.conf");
    assert!(
        std::fs::read_to_string(&policy)
            .expect("read")
            .contains("<policy group=\"x--y-\">")
    );
    assert_policy_loads(&policy);
}

fn append_line(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open")
        .write_all(text.as_bytes())
        .expect("append");
}

#[test]
fn an_executable_path_that_is_not_utf8_is_refused_not_mangled() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let exec = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9-server"));
    install_executable(&exec);
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(common::cli_path());
    cmd.arg("generate")
        .arg("--out-dir")
        .arg(out.path())
        .arg("--exec")
        .arg(&exec)
        .args(["--user", "daemon", "org.example.Latin1"]);
    let mut generate = Proc::spawn(cmd);
    let code = generate.exit_code();
    let stderr = generate.stderr_until_closed().join("\n");
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("not valid UTF-8") && stderr.contains("\\xE9"),
        "{stderr}"
    );
    assert!(tree(out.path()).is_empty(), "wrote something");
}

#[test]
fn a_failure_midway_writes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    // The third file's directory cannot be written to (as an ordinary user: root may write
    // anywhere), so the first two could be written before the third fails.
    let root = example_root();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = tempfile::tempdir().expect("tempdir");
    let as_root = rustix::process::geteuid().is_root();
    let blocked = out.path().join("systemd/tmpfiles.d");
    std::fs::create_dir_all(&blocked).expect("mkdir");
    if as_root {
        for dir in [out.path(), &out.path().join("systemd"), &blocked] {
            std::os::unix::fs::chown(dir, Some(common::NOBODY), Some(common::NOBODY))
                .expect("chown");
        }
    }
    std::fs::set_permissions(&blocked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let mut cmd = Command::new(common::cli_path());
    cmd.arg("generate")
        .arg("--root")
        .arg(root.path())
        .arg("--out-dir")
        .arg(out.path())
        .args(["--exec", EXAMPLE_EXEC, "--user", EXAMPLE_USER, EXAMPLE_NAME]);
    let mut generate = if as_root {
        Proc::spawn(common::as_user(common::NOBODY, common::NOBODY, &cmd))
    } else {
        Proc::spawn(cmd)
    };
    let code = generate.exit_code();
    let stderr = generate.stderr_until_closed().join("\n");
    assert_eq!(code, 74, "{stderr}");
    assert!(
        stderr.contains("tmpfiles.d") && stderr.contains("nothing was written"),
        "{stderr}"
    );
    assert!(
        tree(out.path()).is_empty(),
        "files were written: {:?}",
        tree(out.path()).keys().collect::<Vec<_>>()
    );
    // Nor the directories it made on the way.
    for made in ["systemd/user", "dbus"] {
        assert!(!out.path().join(made).exists(), "{made} left behind");
    }
}

/// systemd reads no line longer than `LONG_LINE_MAX` (1 MiB): arguments that are each fine (the
/// kernel's limit on one is 128 KiB) but together longer make an `ExecStart=` line (and the
/// files' "Written by" comments) that it refuses ("No buffer space available"), in the unit and
/// in the tmpfiles.d file alike; and dbus-daemon drops an activation file over 128 KiB. The
/// generator refuses them (64, naming the limit) and writes nothing, rather than exit 0 with
/// files that do not load; shorter ones still load.
#[test]
fn arguments_past_systemds_line_limit_are_refused() {
    let out = tempfile::tempdir().expect("tempdir");
    // `count` arguments of `len` bytes each.
    let generate = |len: usize, count: usize| {
        let long = "a".repeat(len);
        let mut args = vec![
            "generate",
            "--out-dir",
            out.path().to_str().expect("utf-8"),
            "--exec",
            "/bin/true",
            "--user",
            "daemon",
            "org.example.Big",
            "--",
        ];
        args.extend(std::iter::repeat_n(long.as_str(), count));
        cli(&args)
    };
    let (code, _, stderr) = generate(100_000, 12);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("line limit") && stderr.contains("1 MiB") && stderr.contains("systemd"),
        "{stderr}"
    );
    assert!(tree(out.path()).is_empty(), "wrote something");
    // Short enough for systemd, too long for dbus-daemon, which drops an activation file over
    // 128 KiB without a word (the name could then never be activated).
    let (code, _, stderr) = generate(100_000, 3);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("services/org.example.Big.service") && stderr.contains("dbus-daemon"),
        "{stderr}"
    );
    assert!(tree(out.path()).is_empty(), "wrote something");
    let (code, _, stderr) = generate(25_000, 2);
    assert_eq!(code, 0, "{stderr}");
    let system = out.path().join("systemd/org.example.Big.service");
    assert_verifies(&["verify", system.to_str().expect("utf-8")], &[]);
}

/// What sits at an output path is compared with the file meant for it only if it is a regular
/// file: a FIFO was opened and read (the generator hung for ever), a symlink to `/dev/zero`
/// read until memory ran out. Anything else there is refused, named, and nothing is written.
#[test]
fn what_is_not_a_regular_file_at_an_output_path_is_refused_not_read() {
    let fifo = |path: &Path| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo")
    };
    let zero = |path: &Path| std::os::unix::fs::symlink("/dev/zero", path).expect("symlink");
    for (make, kind) in [
        (&fifo as &dyn Fn(&Path), "a FIFO"),
        (&zero as &dyn Fn(&Path), "a symbolic link"),
    ] {
        let out = tempfile::tempdir().expect("tempdir");
        let services = out.path().join("dbus/services");
        std::fs::create_dir_all(&services).expect("mkdir");
        let planted = services.join("org.example.Planted.service");
        make(&planted);
        let (code, _, stderr) = cli(&[
            "generate",
            "--out-dir",
            out.path().to_str().expect("utf-8"),
            "--exec",
            "/bin/true",
            "--user",
            "daemon",
            "org.example.Planted",
        ]);
        assert_eq!(code, 73, "{kind}: {stderr}");
        assert!(
            stderr.contains(kind) && stderr.contains(&planted.display().to_string()),
            "{kind}: {stderr}"
        );
        assert!(
            !out.path().join("systemd").exists(),
            "{kind}: wrote something"
        );
        assert!(
            std::fs::symlink_metadata(&planted).is_ok(),
            "{kind}: what was planted is gone"
        );
    }
}
