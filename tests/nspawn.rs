//! The shipped deployment on a real booted systemd with a real system bus: a container booted
//! with `systemd-nspawn` from this machine's own `/usr`, with systemd/ and dbus/ installed where
//! the README says and the built binaries bound in.
//!
//! Over 400 lines: one file per subject, each test self-contained (the shared harness is in
//! `tests/common`).
//!
//! The container is driven with `nsenter` into its namespaces (it is not registered with a
//! machine manager: this machine's PID 1 is not systemd). Every wait is on a real condition with
//! a deadline, and the container is powered off, or killed, whatever happens.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{Proc, example_path, require_program};

const NAME: &str = "org.example.Server";
/// The same server deployed with `generate --type notify`.
const NOTIFY_NAME: &str = "org.example.Notified";
const UNIT: &str = "org.example.Server.service";
const SERVER: &str = "/usr/local/libexec/unique-instance/example-server";
const CLI: &str = "/usr/local/bin/unique-instance";
const PATH: &str = "PATH=/usr/local/bin:/usr/sbin:/usr/bin";
/// The service user of the shipped files, and a user whose manager runs the user unit.
const SERVICE_USER: &str = "example-server";
/// The service's lock file, in its own lock directory (made by its tmpfiles.d file).
const SERVICE_LOCK_FILE: &str = "/run/unique-instance/org.example.Server/org.example.Server.lock";
const NOBODY: u32 = 65534;
/// How long the container has to power off before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// How long a unit has to reach a state (restart, activation).
const STATE_DEADLINE: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The first id from `start` that neither `etc/passwd` nor `etc/group` uses.
fn free_id(etc: &Path, start: u32) -> u32 {
    let used: Vec<u32> = ["passwd", "group"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(etc.join(f))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(':').nth(2)?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    (start..).find(|id| !used.contains(id)).expect("a free id")
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("append");
}

fn install(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
}

/// What a command run inside printed, and how it ended.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A booted container. Dropping it powers it off (SIGTERM to nspawn, which asks the container's
/// systemd for an orderly shutdown) and kills it if that takes longer than `POWEROFF_GRACE`.
struct Container {
    nspawn: Child,
    leader: u32,
    log: PathBuf,
    service_uid: u32,
    user_uid: u32,
    // Removed once the container is gone.
    _root: tempfile::TempDir,
    // Last: the next container boots only once this one and its root are gone.
    _alone: std::sync::MutexGuard<'static, ()>,
}

impl Container {
    fn boot(bus: Broker) -> Container {
        assert!(
            rustix::process::geteuid().is_root(),
            "booting a container needs root (CI runs as root)"
        );
        let alone = ONE_CONTAINER_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let nspawn = require_program("systemd-nspawn", "systemd-container");
        require_program("nsenter", "util-linux");
        let root = tempfile::Builder::new()
            .prefix("unique-instance-nspawn-")
            .tempdir()
            .expect("tempdir");
        let dir = root.path().join("root");
        let etc = dir.join("etc");
        for d in [
            "usr", "var/tmp", "run", "root", "home", "proc", "sys", "dev",
        ] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        std::fs::create_dir_all(dir.join("tmp")).expect("mkdir");
        std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        for link in ["bin", "lib", "lib64", "sbin"] {
            if Path::new("/").join(link).exists() {
                std::os::unix::fs::symlink(format!("usr/{link}"), dir.join(link)).expect("symlink");
            }
        }
        // This machine's /etc, trimmed of what it enables for itself (a database, timers...):
        // the container boots only what systemd itself needs, plus our files.
        let copied = common::status_within_timeout({
            let mut cp = Command::new("cp");
            cp.args(["-a", "/etc"]).arg(&etc);
            cp
        });
        assert!(copied.success(), "cannot copy /etc");
        for entry in std::fs::read_dir(etc.join("systemd/system"))
            .expect("ls")
            .flatten()
        {
            if entry.file_name().to_string_lossy().ends_with(".wants") {
                std::fs::remove_dir_all(entry.path()).expect("rm wants");
            }
        }
        // The bus daemon, system and user: Debian's dbus.service is dbus-daemon, and
        // installing dbus-broker (as this machine may have) makes dbus.service an alias of
        // dbus-broker.service in /etc. Each test chooses, whatever this machine chose.
        for (dir, target) in [
            (
                "systemd/system",
                "/usr/lib/systemd/system/dbus-broker.service",
            ),
            ("systemd/user", "/usr/lib/systemd/user/dbus-broker.service"),
        ] {
            let alias = etc.join(dir).join("dbus.service");
            let _ = std::fs::remove_file(&alias);
            if bus == Broker::DbusBroker {
                assert!(
                    Path::new(target).is_file(),
                    "{target} is missing: install it with `apt-get install -y dbus-broker` (the \
                     test does not skip)"
                );
                std::fs::create_dir_all(etc.join(dir)).expect("mkdir");
                std::os::unix::fs::symlink(target, &alias).expect("symlink");
            }
        }
        // nspawn --boot wants an os-release it can read before /usr is mounted.
        let _ = std::fs::remove_file(etc.join("os-release"));
        std::fs::copy("/usr/lib/os-release", etc.join("os-release")).expect("os-release");
        let machine_id = format!(
            "{:016x}{:016x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("time")
                .as_nanos() as u64
        );
        std::fs::write(etc.join("machine-id"), format!("{machine_id}\n")).expect("machine-id");

        // The users: the service's, and one whose user manager runs the user unit.
        let service_uid = free_id(&etc, 990);
        append(
            &etc.join("passwd"),
            &format!(
                "{SERVICE_USER}:x:{service_uid}:{service_uid}::/nonexistent:/usr/sbin/nologin\n"
            ),
        );
        append(
            &etc.join("group"),
            &format!("{SERVICE_USER}:x:{service_uid}:\n"),
        );
        append(
            &etc.join("shadow"),
            &format!("{SERVICE_USER}:!:19000::::::\n"),
        );
        let user_uid = free_id(&etc, 4242);
        append(
            &etc.join("passwd"),
            &format!("uitest:x:{user_uid}:{user_uid}::/home/uitest:/bin/sh\n"),
        );
        append(&etc.join("group"), &format!("uitest:x:{user_uid}:\n"));
        append(&etc.join("shadow"), "uitest:!:19000::::::\n");
        let home = dir.join("home/uitest");
        std::fs::create_dir_all(&home).expect("home");
        std::os::unix::fs::chown(&home, Some(user_uid), Some(user_uid)).expect("chown");

        // The shipped files, installed where the README (and `generate`) says.
        install(
            &repo().join("systemd").join(UNIT),
            &etc.join("systemd/system").join(UNIT),
        );
        install(
            &repo().join("systemd/user").join(UNIT),
            &etc.join("systemd/user").join(UNIT),
        );
        install(
            &repo().join(format!("systemd/tmpfiles.d/{NAME}.conf")),
            &etc.join(format!("tmpfiles.d/{NAME}.conf")),
        );
        install(
            &repo().join(format!("dbus/{NAME}.conf")),
            &etc.join(format!("dbus-1/system.d/{NAME}.conf")),
        );
        // /usr is this machine's, read-only; /usr/local gets a layer of ours on top.
        let local = root.path().join("usr-local");
        install(
            &repo().join(format!("dbus/system-services/{NAME}.service")),
            &local.join(format!("share/dbus-1/system-services/{NAME}.service")),
        );
        install(
            &repo().join(format!("dbus/services/{NAME}.service")),
            &local.join(format!("share/dbus-1/services/{NAME}.service")),
        );
        // And a Type=notify deployment of the same server under another name, as `generate`
        // writes it (its checks run against a copy of the container's users).
        let check_root = root.path().join("generate-root");
        std::fs::create_dir_all(check_root.join("etc")).expect("mkdir");
        std::fs::copy(etc.join("passwd"), check_root.join("etc/passwd")).expect("passwd");
        std::fs::copy(etc.join("group"), check_root.join("etc/group")).expect("group");
        let placeholder = check_root.join(SERVER.trim_start_matches('/'));
        std::fs::create_dir_all(placeholder.parent().expect("parent")).expect("mkdir");
        std::fs::write(&placeholder, "").expect("write");
        std::fs::set_permissions(&placeholder, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let notify_files = root.path().join("notify-files");
        let mut generate = Proc::spawn({
            let mut cmd = Command::new(common::cli_path());
            cmd.arg("generate")
                .arg("--root")
                .arg(&check_root)
                .arg("--out-dir")
                .arg(&notify_files)
                .args(["--exec", SERVER, "--user", SERVICE_USER, "--type", "notify"])
                .args([NOTIFY_NAME, "--", NOTIFY_NAME]);
            cmd
        });
        assert_eq!(generate.exit_code(), 0, "{:?}", generate.stderr_lines());
        let notify_unit = format!("{NOTIFY_NAME}.service");
        install(
            &notify_files.join("systemd").join(&notify_unit),
            &etc.join("systemd/system").join(&notify_unit),
        );
        // Its policy is installed once the bus runs (step 6), where the test puts it first.
        install(
            &notify_files.join(format!("dbus/{NOTIFY_NAME}.conf")),
            &dir.join(format!("root/{NOTIFY_NAME}.conf")),
        );
        install(
            &notify_files.join(format!("systemd/tmpfiles.d/{NOTIFY_NAME}.conf")),
            &etc.join(format!("tmpfiles.d/{NOTIFY_NAME}.conf")),
        );
        // Mount points for the built binaries, bound in read-only.
        for target in [SERVER, CLI] {
            let point = local.join(target.trim_start_matches("/usr/local/"));
            std::fs::create_dir_all(point.parent().expect("parent")).expect("mkdir");
            std::fs::write(&point, "").expect("mount point");
        }

        let log = root.path().join("console.log");
        let machine = format!(
            "ui-test-{}-{}",
            std::process::id(),
            machine_id.get(..8).unwrap_or("0")
        );
        let mut cmd = Command::new(nspawn);
        // A cgroup v2 tree for the container even on a host with v1 controllers (hybrid): in
        // the hybrid mode systemd misses cgroup-empty events in a container, and a user
        // manager's stop then hangs for its whole timeout (power-off took two minutes).
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        cmd.arg("--quiet")
            .arg("--boot")
            .arg(format!("--directory={}", dir.display()))
            .arg(format!("--machine={machine}"))
            // Not registered: there is no machine manager here, and none is needed.
            .arg("--register=no")
            .arg("--keep-unit")
            .arg("--private-network")
            .arg("--console=pipe")
            .arg("--bind-ro=/usr")
            .arg(format!(
                "--overlay-ro=/usr/local:{}:/usr/local",
                local.display()
            ))
            .arg(format!(
                "--bind-ro={}:{SERVER}",
                example_path("server").display()
            ))
            .arg(format!("--bind-ro={}:{CLI}", common::cli_path().display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(log.with_extension("err")).expect("log"));
        let child = cmd.spawn().expect("spawn systemd-nspawn");
        let mut container = Container {
            leader: 0,
            nspawn: child,
            log,
            service_uid,
            user_uid,
            _root: root,
            _alone: alone,
        };
        container.leader = container.find_leader();
        // Its manager listens once its private socket exists (seen through its root).
        let socket = format!("/proc/{}/root/run/systemd/private", container.leader);
        let deadline = Instant::now() + STATE_DEADLINE;
        while !Path::new(&socket).exists() {
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not listen within {STATE_DEADLINE:?}: {}",
                container.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Booted: every start-up job done (running, or degraded if some unit of this machine's
        // failed in a container: then the failures are shown, and ours still must work).
        let booted = container.run(&["systemctl", "is-system-running", "--wait"]);
        assert!(
            booted.stdout.trim() == "running" || booted.stdout.trim() == "degraded",
            "the container did not boot: {booted:?}"
        );
        if booted.stdout.trim() == "degraded" {
            eprintln!(
                "note: the container booted degraded: {}",
                container
                    .run(&["systemctl", "--failed", "--no-legend"])
                    .stdout
            );
        }
        container
    }

    /// The container's init: nspawn's child, once it runs systemd.
    fn find_leader(&mut self) -> u32 {
        let deadline = Instant::now() + STATE_DEADLINE;
        let nspawn = self.nspawn.id();
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                    .unwrap_or_default();
            for pid in children.split_whitespace() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid.parse().expect("pid");
                }
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}): {}", self.console());
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not start within {STATE_DEADLINE:?}: {}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn console(&self) -> String {
        format!(
            "console: {}\nnspawn: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
        )
    }

    /// `args` inside the container as `uid` (`None`: root), with a clean environment plus
    /// `env`.
    fn command(&self, uid: Option<u32>, env: &[String], args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--");
        if let Some(uid) = uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        cmd.args(["env", "-i", PATH, "LANG=C.UTF-8"])
            .args(env)
            .args(args)
            .env_clear();
        cmd
    }

    fn run_as(&self, uid: Option<u32>, env: &[String], args: &[&str]) -> Output {
        let mut proc = Proc::spawn(self.command(uid, env, args));
        let code = proc.exit_code();
        Output {
            code,
            stdout: proc.stdout_until_closed().join("\n"),
            stderr: proc.stderr_until_closed().join("\n"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_as(None, &[], args)
    }

    /// Like [`Container::run`], and it must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.code, 0, "{args:?} failed: {out:?}");
        out.stdout
    }

    /// The environment of the test user's session.
    fn user_env(&self) -> Vec<String> {
        vec![
            format!("XDG_RUNTIME_DIR=/run/user/{}", self.user_uid),
            format!(
                "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{}/bus",
                self.user_uid
            ),
        ]
    }

    fn as_user(&self, args: &[&str]) -> Output {
        self.run_as(Some(self.user_uid), &self.user_env(), args)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && self.leader != 0 {
            // What the container's journal says is what explains a failure in CI. (Bounded by
            // timeout(1), and nothing here may panic: we are unwinding already.)
            let journal = Command::new("timeout")
                .args(["10", "nsenter", "-t", &self.leader.to_string(), "-a", "--"])
                .args([
                    "sh",
                    "-c",
                    "journalctl -b --no-pager -o short-monotonic | tail -n 100",
                ])
                .stdin(Stdio::null())
                .output();
            if let Ok(journal) = journal {
                eprintln!(
                    "container journal (last lines):\n{}",
                    String::from_utf8_lossy(&journal.stdout)
                );
            }
            eprintln!("{}", self.console());
        }
        // SIGTERM makes nspawn ask the container's systemd for an orderly power-off.
        if let Some(pid) = rustix::process::Pid::from_raw(self.nspawn.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let pid = self.nspawn.id();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
            let _ = tx.send(rustix::process::waitpid(
                Some(pid),
                rustix::process::WaitOptions::empty(),
            ));
        });
        if rx.recv_timeout(POWEROFF_GRACE).is_err() {
            eprintln!("the container did not power off within {POWEROFF_GRACE:?}: killing it");
            // Killing the container's init kills every process of its PID namespace.
            if let Some(leader) = rustix::process::Pid::from_raw(self.leader as i32) {
                let _ = rustix::process::kill_process(leader, rustix::process::Signal::KILL);
            }
            let _ = self.nspawn.kill();
            let _ = rx.recv_timeout(POWEROFF_GRACE);
        }
    }
}

/// A unit's properties, from `systemctl [--user] show`.
fn show(c: &Container, user: bool, unit: &str, property: &str) -> String {
    let args = ["systemctl", "show", "--value", "-p", property, unit];
    let out = if user {
        let mut with_user = vec!["systemctl", "--user"];
        with_user.extend_from_slice(&args[1..]);
        c.as_user(&with_user)
    } else {
        c.run(&args)
    };
    assert_eq!(out.code, 0, "systemctl show: {out:?}");
    out.stdout.trim().to_owned()
}

/// The PID of the owner of `NAME` on the system bus (`user`: the test user's session bus).
fn bus_owner(c: &Container, user: bool) -> Option<String> {
    let bus = if user { "--user" } else { "--system" };
    let call = |method: &str| {
        let args = [
            "busctl",
            bus,
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            method,
            "s",
            NAME,
        ];
        let out = if user { c.as_user(&args) } else { c.run(&args) };
        assert_eq!(out.code, 0, "busctl {method}: {out:?}");
        out.stdout.trim().to_owned()
    };
    match call("NameHasOwner").as_str() {
        "b false" => None,
        "b true" => Some(
            call("GetConnectionUnixProcessID")
                .strip_prefix("u ")
                .expect("u PID")
                .to_owned(),
        ),
        other => panic!("NameHasOwner answered {other:?}"),
    }
}

/// `kill -9 PID` inside (the shell's own kill: procps need not be installed).
fn kill_9(c: &Container, pid: &str) {
    c.ok(&["sh", "-c", &format!("kill -KILL {pid}")]);
}

/// Waits until `check` holds, polling a real condition until a deadline.
fn wait_until(what: &str, mut check: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + STATE_DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {STATE_DEADLINE:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A hand-started copy is refused, naming the running copy's PID.
fn assert_refused_naming(out: &Output, pid: &str, who: &str) {
    assert_eq!(out.code, 75, "{who}: {out:?}");
    assert!(
        out.stderr.contains("already running") && out.stderr.contains(&format!("pid {pid},")),
        "{who} was not told pid {pid}: {out:?}"
    );
}

/// Which program is the container's bus (system and user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    DbusDaemon,
    DbusBroker,
}

#[test]
fn shipped_units_on_a_booted_systemd() {
    shipped_units_on(Broker::DbusDaemon);
}

/// The same with dbus-broker as the system bus and the user's bus (README, "dbus-broker").
#[test]
fn shipped_units_on_a_booted_systemd_with_dbus_broker() {
    shipped_units_on(Broker::DbusBroker);
}

/// One container at a time, taken by [`Container::boot`] and held by the container until it is
/// gone: unregistered containers (`--register=no --keep-unit`) are put in this process's
/// cgroup, so two booted at once share one cgroup tree, and each one's systemd removes the
/// other's unit cgroups (seen: "Failed to attach to cgroup
/// /system.slice/systemd-tmpfiles-setup.service", status 219/CGROUP, and failed start jobs;
/// and `/run/unique-instance` missing when the stop test's container booted beside this one).
static ONE_CONTAINER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn shipped_units_on(bus: Broker) {
    let started = Instant::now();
    let c = Container::boot(bus);
    eprintln!("booted in {:?}", started.elapsed());
    // The bus is the one asked for: the system bus's main process (dbus-broker-launch's
    // command name is cut to 15 characters).
    let bus_pid = show(&c, false, "dbus.service", "MainPID");
    let comm = c.ok(&["cat", &format!("/proc/{bus_pid}/comm")]);
    let expected = match bus {
        Broker::DbusDaemon => "dbus-daemon",
        Broker::DbusBroker => "dbus-broker-lau",
    };
    assert_eq!(comm.trim(), expected, "the system bus");
    let service_uid = Some(c.service_uid);
    let system_scope = ["UNIQUE_INSTANCE_SCOPE=system".to_owned()];

    // systemd-analyze verify, where the units are installed and their executable exists.
    let verify = c.run(&[
        "systemd-analyze",
        "verify",
        "/etc/systemd/system/org.example.Server.service",
    ]);
    assert!(
        verify.code == 0 && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "{verify:?}"
    );
    // The tmpfiles.d lines made the lock directories at boot: the service's own (only root
    // and the service's user can write there) and the shared one.
    assert_eq!(
        c.ok(&["stat", "-c", "%a %U %G", "/run/unique-instance"])
            .trim(),
        "755 root root"
    );
    assert_eq!(
        c.ok(&[
            "stat",
            "-c",
            "%a %U %G",
            &format!("/run/unique-instance/{NAME}")
        ])
        .trim(),
        format!("755 {SERVICE_USER} {SERVICE_USER}")
    );
    assert_eq!(
        c.ok(&["stat", "-c", "%a %U %G", "/run/lock/unique-instance"])
            .trim(),
        "1777 root root"
    );

    // 1. Type=dbus readiness. While a copy started by hand (root's `run`, holding the lock
    // file alone) runs, the service's process runs and waits for it, nobody owns the name, and
    // the unit stays "activating"; once the hand copy is gone the service takes the lock file,
    // then the name, and only then is the unit "active". (--wait, from a drop-in, makes it wait
    // instead of exiting 75.)
    let mut hand = Proc::spawn(c.command(
        None,
        &[],
        &[
            CLI,
            "run",
            "--system",
            "--backend",
            "lockfile",
            NAME,
            "--",
            "sh",
            "-c",
            "echo held; exec cat",
        ],
    ));
    assert_eq!(hand.next_line("the hand copy's COMMAND"), "held");
    c.ok(&[
        "mkdir",
        "-p",
        "/run/systemd/system/org.example.Server.service.d",
    ]);
    c.ok(&[
        "sh",
        "-c",
        &format!(
            "printf '[Service]\\nExecStart=\\nExecStart={SERVER} --wait {NAME}\\n' \
             > /run/systemd/system/org.example.Server.service.d/50-wait.conf"
        ),
    ]);
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", "--no-block", UNIT]);
    // The service's own log says when it is waiting for the copy that holds the lock file.
    wait_until("the service's process waits for the hand copy", || {
        let log = c.ok(&["journalctl", "-b", "--no-pager", "-o", "cat", "-u", UNIT]);
        log.contains("waiting for the running copy to exit")
            .then_some(log)
    });
    let waiting_pid = show(&c, false, UNIT, "MainPID");
    assert_ne!(waiting_pid, "0");
    assert_eq!(bus_owner(&c, false), None, "nobody owns the name yet");
    assert_eq!(show(&c, false, UNIT, "ActiveState"), "activating");
    hand.close_stdin();
    assert_eq!(hand.exit_code(), 0);
    // `systemctl start` joins the pending start job and returns once the unit is active.
    c.ok(&["systemctl", "start", UNIT]);
    assert_eq!(show(&c, false, UNIT, "ActiveState"), "active");
    assert_eq!(show(&c, false, UNIT, "MainPID"), waiting_pid);
    assert_eq!(bus_owner(&c, false), Some(waiting_pid.clone()));
    // Back to the shipped unit, started plainly.
    c.ok(&["systemctl", "stop", UNIT]);
    c.ok(&[
        "rm",
        "-r",
        "/run/systemd/system/org.example.Server.service.d",
    ]);
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", UNIT]);
    let main_pid = show(&c, false, UNIT, "MainPID");
    assert_eq!(
        bus_owner(&c, false),
        Some(main_pid.clone()),
        "owner is the main PID"
    );
    assert_eq!(
        c.ok(&["stat", "-c", "%U %a", SERVICE_LOCK_FILE]).trim(),
        "example-server 644",
        "the service's lock file, in its own directory"
    );

    // 2. Copies started by hand are refused, naming the service's PID: as root (Auto scope is
    // the system scope for root), as the service user and as another user (with the system
    // scope, as the unit has it), the example server and `unique-instance run` alike.
    let run_true = [CLI, "run", NAME, "--", "true"];
    let run_system = [CLI, "run", "--system", NAME, "--", "true"];
    assert_refused_naming(&c.run(&[SERVER, NAME]), &main_pid, "root's example server");
    assert_refused_naming(&c.run(&run_true), &main_pid, "root's run");
    assert_refused_naming(
        &c.run_as(service_uid, &system_scope, &[SERVER, NAME]),
        &main_pid,
        "the service user's example server",
    );
    assert_refused_naming(
        &c.run_as(service_uid, &[], &run_system),
        &main_pid,
        "the service user's run --system",
    );
    assert_refused_naming(
        &c.run_as(Some(NOBODY), &[], &run_system),
        &main_pid,
        "nobody's run --system",
    );
    // They meet the service's lock file, not only its bus name: with the lock file alone.
    let run_lock_file = [
        CLI,
        "run",
        "--system",
        "--backend",
        "lockfile",
        NAME,
        "--",
        "true",
    ];
    for (who, uid) in [
        ("root", None),
        ("the service user", service_uid),
        ("nobody", Some(NOBODY)),
    ] {
        assert_refused_naming(
            &c.run_as(uid, &[], &run_lock_file),
            &main_pid,
            &format!("{who}'s run --system --backend lockfile"),
        );
    }
    let status = c.ok(&[CLI, "status", "--system", "--json", NAME]);
    assert!(status.contains(&format!("\"pid\":{main_pid},")), "{status}");

    // 3. kill -9 of the main PID: systemd restarts it, and the new main PID owns the name.
    kill_9(&c, &main_pid);
    let restarted_pid = wait_until("systemd restarted the service", || {
        let pid = show(&c, false, UNIT, "MainPID");
        (show(&c, false, UNIT, "ActiveState") == "active" && pid != "0" && pid != main_pid)
            .then_some(pid)
    });
    assert_eq!(show(&c, false, UNIT, "NRestarts"), "1");
    assert_eq!(bus_owner(&c, false), Some(restarted_pid.clone()));

    // 4. Stopped, a method call to the name (from an unprivileged user: callers are everyone)
    // starts it through D-Bus activation.
    c.ok(&["systemctl", "stop", UNIT]);
    assert_eq!(show(&c, false, UNIT, "ActiveState"), "inactive");
    assert_eq!(bus_owner(&c, false), None);
    let call = c.run_as(
        Some(NOBODY),
        &[],
        &[
            "busctl",
            "--system",
            "call",
            NAME,
            "/org/example/Server",
            "org.example.Server1",
            "Pid",
        ],
    );
    assert_eq!(call.code, 0, "{call:?}");
    let activated_pid = call
        .stdout
        .trim()
        .strip_prefix("u ")
        .expect("u PID")
        .to_owned();
    assert_eq!(show(&c, false, UNIT, "ActiveState"), "active");
    assert_eq!(show(&c, false, UNIT, "MainPID"), activated_pid);

    // 5. The user unit, under the test user's own systemd, on its session bus.
    c.ok(&[
        "systemctl",
        "start",
        &format!("user@{}.service", c.user_uid),
    ]);
    let verify = c.as_user(&[
        "systemd-analyze",
        "--user",
        "verify",
        "/etc/systemd/user/org.example.Server.service",
    ]);
    assert!(
        verify.code == 0 && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "{verify:?}"
    );
    let user_start = c.as_user(&["systemctl", "--user", "start", UNIT]);
    assert_eq!(user_start.code, 0, "{user_start:?}");
    let user_pid = show(&c, true, UNIT, "MainPID");
    assert_eq!(show(&c, true, UNIT, "ActiveState"), "active");
    assert_eq!(bus_owner(&c, true), Some(user_pid.clone()));
    assert_refused_naming(
        &c.as_user(&[SERVER, NAME]),
        &user_pid,
        "the user's example server",
    );
    assert_refused_naming(&c.as_user(&run_true), &user_pid, "the user's run");
    kill_9(&c, &user_pid);
    let user_restarted = wait_until("the user's systemd restarted the service", || {
        let pid = show(&c, true, UNIT, "MainPID");
        (show(&c, true, UNIT, "ActiveState") == "active" && pid != "0" && pid != user_pid)
            .then_some(pid)
    });
    assert_eq!(show(&c, true, UNIT, "NRestarts"), "1");
    assert_eq!(bus_owner(&c, true), Some(user_restarted));
    let stopped = c.as_user(&["systemctl", "--user", "stop", UNIT]);
    assert_eq!(stopped.code, 0, "{stopped:?}");
    assert_eq!(bus_owner(&c, true), None);
    let call = c.as_user(&[
        "busctl",
        "--user",
        "call",
        NAME,
        "/org/example/Server",
        "org.example.Server1",
        "Pid",
    ]);
    assert_eq!(call.code, 0, "{call:?}");
    let activated = call
        .stdout
        .trim()
        .strip_prefix("u ")
        .expect("u PID")
        .to_owned();
    assert_eq!(show(&c, true, UNIT, "ActiveState"), "active");
    assert_eq!(show(&c, true, UNIT, "MainPID"), activated);
    // The system service was never disturbed: system and user instances are separate scopes.
    assert_eq!(show(&c, false, UNIT, "MainPID"), activated_pid);

    // 6. A policy installed while the bus runs. Both dbus-daemon and dbus-broker notice new
    // policy files by themselves, but asynchronously (inotify): a service started right away
    // may still be refused its name (dbus-broker issue 206). `systemctl reload dbus.service`
    // (ReloadConfig) returns once the bus has read them: the barrier the README prescribes.
    let notify_unit = format!("{NOTIFY_NAME}.service");
    c.ok(&[
        "cp",
        &format!("/root/{NOTIFY_NAME}.conf"),
        &format!("/etc/dbus-1/system.d/{NOTIFY_NAME}.conf"),
    ]);
    c.ok(&["systemctl", "reload", "dbus.service"]);

    // 7. Type=notify: the unit is active once the library's READY=1 came from the main
    // process, and its status line (STATUS=) names the instance.
    c.ok(&["systemctl", "start", &notify_unit]);
    assert_eq!(show(&c, false, &notify_unit, "Type"), "notify");
    assert_eq!(show(&c, false, &notify_unit, "ActiveState"), "active");
    let notify_pid = show(&c, false, &notify_unit, "MainPID");
    let status_text = show(&c, false, &notify_unit, "StatusText");
    assert!(
        status_text.starts_with(&format!(
            "{NOTIFY_NAME}: running as the single instance (pid {notify_pid},"
        )),
        "{status_text}"
    );
    let owner = c.ok(&[
        "busctl",
        "--system",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetConnectionUnixProcessID",
        "s",
        NOTIFY_NAME,
    ]);
    assert_eq!(owner.trim(), format!("u {notify_pid}"));
    assert_refused_naming(
        &c.run(&[SERVER, NOTIFY_NAME]),
        &notify_pid,
        "root's copy of the notify service",
    );
    // 8. No local user can squat the service's lock file. Only root and the service's user
    // can write in its directory (and only root in /run/unique-instance); a user who takes
    // the lock file where every service's used to be, in the shared /run/lock/unique-instance,
    // first, does not stop the service from starting.
    c.ok(&["systemctl", "stop", UNIT]);
    for path in [
        "/run/unique-instance/org.example.Other".to_owned(),
        SERVICE_LOCK_FILE.to_owned(),
    ] {
        let touch = c.run_as(Some(NOBODY), &[], &["touch", &path]);
        assert_ne!(touch.code, 0, "nobody created {path}: {touch:?}");
    }
    let refused = c.run_as(
        Some(NOBODY),
        &[],
        &[
            CLI,
            "run",
            "--system",
            "--backend",
            "lockfile",
            NAME,
            "--",
            "true",
        ],
    );
    assert_eq!(
        refused.code, 77,
        "nobody took the service's lock file: {refused:?}"
    );
    let mut squatter = Proc::spawn(c.command(
        Some(NOBODY),
        &[],
        &[
            CLI,
            "run",
            "--system",
            "--backend",
            "lockfile",
            "--lock-file",
            &format!("/run/lock/unique-instance/{NAME}.lock"),
            NAME,
            "--",
            "sh",
            "-c",
            "echo held; exec cat",
        ],
    ));
    assert_eq!(squatter.next_line("the squatter's COMMAND"), "held");
    c.ok(&["systemctl", "start", UNIT]);
    let unsquatted_pid = show(&c, false, UNIT, "MainPID");
    assert_eq!(show(&c, false, UNIT, "ActiveState"), "active");
    assert_eq!(bus_owner(&c, false), Some(unsquatted_pid));
    assert_eq!(
        c.ok(&["stat", "-c", "%U", SERVICE_LOCK_FILE]).trim(),
        SERVICE_USER
    );
    squatter.close_stdin();
    assert_eq!(squatter.exit_code(), 0);
    eprintln!("all steps done {:?} after the start", started.elapsed());
}

/// `systemctl stop` of a unit that runs `unique-instance run`: COMMAND gets the stop signal
/// exactly once, whether systemd signals the whole cgroup (`KillMode=control-group`, the
/// default: the wrapper must not pass it on again) or the main process alone (`mixed`: the
/// wrapper must pass it on) — and still once when the wrapper then dies by SIGKILL before
/// COMMAND has stopped, as when systemd SIGKILLs the unit's processes one by one once
/// `TimeoutStopSec` is up and the keeper sees the wrapper die first: the keeper, left to stop
/// the tree, must know that COMMAND has had its SIGTERM. With `mixed` the wrapper is killed
/// here on purpose, before the timeout; with `control-group` that would make systemd itself
/// send the rest of the unit a second SIGTERM (its `final-sigterm` step, once the main process
/// is gone), so the timeout's SIGKILLs are left to come, and the race to happen or not.
#[test]
fn command_under_systemctl_stop_gets_one_sigterm() {
    let c = Container::boot(Broker::DbusDaemon);
    for (i, kill_mode) in ["control-group", "mixed"].into_iter().enumerate() {
        let unit = format!("cli-stop-{i}.service");
        let log = format!("/run/cli-stop-{i}.log");
        let ready = format!("{log}.ready");
        let name = format!("org.example.CliStop{i}");
        // COMMAND writes a line per SIGTERM and waits on (perl: Essential in Debian). It never
        // exits by itself: TimeoutStopSec ends the stop, after any second SIGTERM came.
        let command = format!(
            "$SIG{{TERM}} = sub {{ open my $f, '>>', '{log}'; print $f qq(TERM\\n); close $f }}; \
             open my $r, '>', '{ready}'; close $r; sleep while 1"
        );
        c.ok(&[
            "systemd-run",
            &format!("--unit={unit}"),
            &format!("--property=KillMode={kill_mode}"),
            "--property=TimeoutStopSec=3",
            "--setenv=RUST_LOG=unique_instance=debug",
            CLI,
            "run",
            "--backend",
            "lockfile",
            &name,
            "--",
            "perl",
            "-e",
            // systemd expands $VAR in a command line; $$ is a plain $.
            &command.replace('$', "$$"),
        ]);
        wait_until("COMMAND has set its SIGTERM handler", || {
            (c.run(&["test", "-e", &ready]).code == 0).then(String::new)
        });
        if kill_mode == "mixed" {
            let wrapper = show(&c, false, &unit, "MainPID");
            c.ok(&["systemctl", "stop", "--no-block", &unit]);
            // COMMAND's handler ran: the keeper has sent it SIGTERM on the wrapper's order.
            // Then the wrapper dies, as systemd's SIGKILL would take it, before COMMAND is gone.
            wait_until("COMMAND has had SIGTERM", || {
                c.run(&["cat", &log])
                    .stdout
                    .contains("TERM")
                    .then(String::new)
            });
            c.ok(&["kill", "-KILL", &wrapper]);
        }
        // Joins the stop job under way, if any, and returns once the unit is stopped.
        c.ok(&["systemctl", "stop", &unit]);
        let terms = c.ok(&["cat", &log]);
        let journal = c.run(&["journalctl", "--no-pager", "-u", &unit]).stdout;
        assert_eq!(
            terms.lines().count(),
            1,
            "KillMode={kill_mode}: COMMAND got SIGTERM {} times: {terms:?}; journal: {journal}",
            terms.lines().count(),
        );
        // Two SIGTERMs close together may reach COMMAND's handler as one, so the wrapper's
        // decision (its debug log) is what proves it did not send a second one.
        let passed_on = journal.contains("passing the signal on to COMMAND signal=15");
        assert_eq!(
            passed_on,
            kill_mode == "mixed",
            "KillMode={kill_mode}: the wrapper passed SIGTERM on: {passed_on}; journal: {journal}"
        );
        // The wrapper told the keeper what COMMAND's tree got from systemd, in case the keeper
        // has to stop the tree itself.
        let told = journal.contains("the keeper knows COMMAND's tree has it");
        assert_eq!(
            told,
            kill_mode == "control-group",
            "KillMode={kill_mode}: the keeper told: {told}; journal: {journal}"
        );
        // (The keeper's own line is not looked for: systemd's final SIGKILL may take it before
        // journald has tied its line to the unit, which it does by the live writer's cgroup.)
    }
}
