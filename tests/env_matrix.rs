//! A model-based test of the environment matrix: pairs of copies drawn from
//! {scope user/system/auto} × {XDG_RUNTIME_DIR set/unset/other} × {session bus yes/no/other
//! bus} × {root/another user} × {working directory}, real processes on the *default* lock paths
//! (no `UNIQUE_INSTANCE_LOCK_DIR`). The model says which pairs are the same identity — the same
//! lock file by the documented rule (the system one for the system scope and for root in Auto,
//! else the user's own by UID) — and for every such pair two live holders must never exist: the
//! second copy is told "already running", naming the first. Whatever the environment offers
//! (a session bus, another one, none, a runtime directory or not), it never moves the lock.
//!
//! Every pair is a case of its own (a fresh name). By default the pairs are a sample that covers
//! every configuration as a first copy, drawn from a seed that changes from run to run and is
//! printed (and named in every failure): `MATRIX_SEED` replays it, `MATRIX_CASES` widens it.
//! `MATRIX_EXHAUSTIVE=1` runs every ordered pair of the same identity instead (4 536 pairs:
//! minutes; the README records a run).

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BusConfig, DbusDaemon, NOBODY, Proc, as_user, example_path, field, unique_name};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeArg {
    User,
    System,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Xdg {
    Set,
    Unset,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bus {
    Yes,
    No,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    scope: ScopeArg,
    xdg: Xdg,
    bus: Bus,
    uid: u32,
    cwd: usize,
}

impl Config {
    /// The model: which lock file this copy takes, by the documented rule alone.
    fn lock_identity(&self) -> String {
        let system = match self.scope {
            ScopeArg::System => true,
            ScopeArg::User => false,
            ScopeArg::Auto => self.uid == 0,
        };
        if system {
            "system".into()
        } else {
            format!("user-{}", self.uid)
        }
    }
}

fn all_copies() -> Vec<Config> {
    let mut copies = Vec::new();
    for scope in [ScopeArg::User, ScopeArg::System, ScopeArg::Auto] {
        for xdg in [Xdg::Set, Xdg::Unset, Xdg::Other] {
            for bus in [Bus::Yes, Bus::No, Bus::Other] {
                for uid in [0, NOBODY] {
                    for cwd in [0, 1] {
                        copies.push(Config {
                            scope,
                            xdg,
                            bus,
                            uid,
                            cwd,
                        });
                    }
                }
            }
        }
    }
    copies
}

/// A small deterministic generator (SplitMix64), so a failing sample replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Everything the copies' environments point at, shared by all cases.
struct World {
    _dir: tempfile::TempDir,
    bus: DbusDaemon,
    other_bus: DbusDaemon,
    /// Per uid: its runtime directory and another one (both its own, 0700).
    runtime: Vec<(u32, PathBuf, PathBuf)>,
    cwds: [PathBuf; 2],
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Reachable by the other user: its buses' sockets and working directories are here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let listen = |file: &str| format!("unix:path={}", dir.path().join(file).display());
        let bus = DbusDaemon::start_listening(
            BusConfig::Open,
            "",
            Some(&listen("bus")),
            "<auth>EXTERNAL</auth>",
        );
        let other_bus = DbusDaemon::start_listening(
            BusConfig::Open,
            "",
            Some(&listen("other-bus")),
            "<auth>EXTERNAL</auth>",
        );
        let mut runtime = Vec::new();
        for uid in [0, NOBODY] {
            let make = |tag: &str| {
                let path = dir.path().join(format!("runtime-{uid}-{tag}"));
                std::fs::create_dir(&path).expect("mkdir");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .expect("chmod");
                std::os::unix::fs::chown(&path, Some(uid), Some(uid)).expect("chown");
                path
            };
            runtime.push((uid, make("a"), make("b")));
        }
        let cwds = ["cwd-a", "cwd-b"].map(|c| {
            let path = dir.path().join(c);
            std::fs::create_dir(&path).expect("mkdir");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        });
        World {
            _dir: dir,
            bus,
            other_bus,
            runtime,
            cwds,
        }
    }

    fn command(&self, copy: &Config, name: &str) -> Command {
        let scope = match copy.scope {
            ScopeArg::User => "user",
            ScopeArg::System => "system",
            ScopeArg::Auto => "auto",
        };
        let mut cmd = Command::new(example_path("holder"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            // No system bus here, whatever the machine has: the lock file decides for the
            // system scope, deterministically.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/nonexistent/unique-instance-test",
            )
            .current_dir(&self.cwds[copy.cwd])
            .args([name, "--scope", scope]);
        let (_, own, other) = self
            .runtime
            .iter()
            .find(|(uid, _, _)| *uid == copy.uid)
            .expect("runtime dirs");
        match copy.xdg {
            Xdg::Set => {
                cmd.env("XDG_RUNTIME_DIR", own);
            }
            Xdg::Other => {
                cmd.env("XDG_RUNTIME_DIR", other);
            }
            Xdg::Unset => {}
        }
        match copy.bus {
            Bus::Yes => {
                cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.bus.address);
            }
            Bus::Other => {
                cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.other_bus.address);
            }
            Bus::No => {}
        }
        if copy.uid == 0 {
            cmd
        } else {
            as_user(copy.uid, copy.uid, &cmd)
        }
    }
}

fn env_number(var: &str, default: u64) -> u64 {
    std::env::var_os(var)
        .map(|v: OsString| {
            v.to_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{var} must be a number"))
        })
        .unwrap_or(default)
}

#[test]
fn two_live_holders_never_for_one_identity_whatever_the_environment() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it runs copies as root and as another user)"
    );
    // The shared system directory, as systemd-tmpfiles makes it at boot, so that the other
    // user's system-scope copies can run first.
    let system_dir = Path::new("/run/lock/unique-instance");
    if !system_dir.exists() {
        std::fs::create_dir_all(system_dir).expect("mkdir");
        std::fs::set_permissions(system_dir, std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
    }
    let fresh_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5EED_0010, |d| d.as_nanos() as u64);
    let seed = env_number("MATRIX_SEED", fresh_seed);
    let world = World::new();
    let copies = all_copies();
    let exhaustive = std::env::var_os("MATRIX_EXHAUSTIVE").is_some_and(|v| v == "1");
    // Every ordered pair of the same identity, the first's own configuration included.
    let every_pair: Vec<(Config, Config)> = copies
        .iter()
        .flat_map(|a| {
            copies
                .iter()
                .filter(|b| b.lock_identity() == a.lock_identity())
                .map(|b| (*a, *b))
        })
        .collect();
    let cases = if exhaustive {
        every_pair.len()
    } else {
        env_number("MATRIX_CASES", 216) as usize
    };
    eprintln!(
        "environment matrix: {} (seed {seed:#x}, MATRIX_SEED={seed} replays it)",
        if exhaustive {
            format!("all {cases} ordered pairs of the same identity")
        } else {
            format!("{cases} pairs of {} of the same identity", every_pair.len())
        }
    );
    let mut rng = Rng(seed);
    // With at least as many cases as configurations, every configuration is a first copy (in
    // order); with fewer, the first copies are drawn. The partner is drawn from the
    // configurations of the same identity, the first's own included.
    let mut checked = 0;
    // First copies that held through a session bus too, for root and the other user: the
    // matrix must really have exercised the bus side, not only the lock file.
    let mut on_a_bus = [0; 2];
    for case in 0..cases {
        let (first, second) = if exhaustive {
            every_pair[case]
        } else {
            let first = if cases >= copies.len() {
                copies[case % copies.len()]
            } else {
                copies[rng.below(copies.len())]
            };
            let partners: Vec<&Config> = copies
                .iter()
                .filter(|c| c.lock_identity() == first.lock_identity())
                .collect();
            (first, *partners[rng.below(partners.len())])
        };
        let name = unique_name("matrix");
        let what = format!("seed {seed:#x} case {case}: {first:?} then {second:?}");
        let mut holder = Proc::spawn(world.command(&first, &name));
        let line = holder.line_starting("");
        assert!(
            line.starts_with("acquired"),
            "{what}: the first copy did not acquire: {line}; stderr: {:?}",
            holder.stderr_lines()
        );
        let holder_pid = field(&line, "pid").expect("pid").to_owned();
        if line.contains("bus=Some(Session)") {
            on_a_bus[usize::from(first.uid != 0)] += 1;
        }
        let mut other = Proc::spawn(world.command(&second, &name));
        let line = other.line_starting("");
        assert!(
            line.starts_with("already-running"),
            "{what}: TWO LIVE HOLDERS (or a false error): {line}; stderr: {:?}",
            other.stderr_lines()
        );
        assert_eq!(
            field(&line, "holder_pid"),
            Some(holder_pid.as_str()),
            "{what}: {line}"
        );
        assert_eq!(other.exit_code(), 75, "{what}");
        holder.close_stdin();
        assert_eq!(holder.line_starting("released"), "released", "{what}");
        assert_eq!(holder.exit_code(), 0, "{what}");
        checked += 1;
    }
    assert_eq!(checked, cases);
    if cases >= copies.len() {
        assert!(
            on_a_bus.iter().all(|&n| n > 0),
            "no first copy of root or of the other user held a session bus name: {on_a_bus:?}"
        );
    }
}
