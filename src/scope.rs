//! Scopes, and the deterministic rules that turn one into a lock directory and a bus.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How far uniqueness reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Scope {
    /// One instance per user: the session bus, and a lock directory chosen from the UID alone
    /// (`/run/lock/unique-instance-UID/`, else `/tmp/unique-instance-UID/`; mode 0700, verified).
    User,
    /// One instance per machine: the system bus, and `/run/unique-instance/NAME/` when a
    /// deployment made that directory, else the shared `/run/lock/unique-instance/`.
    System,
    /// The lock file follows who you are (System for root, User otherwise); the bus follows the
    /// environment (session bus if configured, else the system bus under systemd or system bus
    /// activation, else none).
    #[default]
    Auto,
}

/// Which mechanisms enforce exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// Both: the lock file always, then the bus name when a bus is available.
    #[default]
    Auto,
    /// The D-Bus name only. Fails when no bus is reachable.
    Dbus,
    /// The lock file only.
    LockFile,
}

/// Which message bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BusKind {
    /// The user's session bus.
    Session,
    /// The machine's system bus.
    System,
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Session => "session",
            BusKind::System => "system",
        })
    }
}

/// The environment variable that points the lock directory elsewhere (tests, sandboxes).
///
/// Every copy that should exclude the others must see the same value.
pub const LOCK_DIR_ENV: &str = "UNIQUE_INSTANCE_LOCK_DIR";

/// The environment variable that sets the scope of a program that did not choose one in code
/// ([`crate::InstanceOptions::scope`]): `user`, `system` or `auto`.
///
/// It is how a deployment tells a server that calls [`crate::ensure_single_instance`] what it
/// is: the system unit that `unique-instance generate` writes sets `UNIQUE_INSTANCE_SCOPE=system`,
/// so a service running under its own `User=` takes its lock file in the system scope's
/// directory (its own `/run/unique-instance/NAME/`, else the shared one), where a copy started by
/// hand meets it. Any other value is an
/// error ([`crate::Error::InvalidEnvironment`]), never a guess.
pub const SCOPE_ENV: &str = "UNIQUE_INSTANCE_SCOPE";

/// Reads [`SCOPE_ENV`]; `None` when it is unset or empty. A value that is not UTF-8 is an
/// error like any other unknown value, never taken for "unset".
pub(crate) fn scope_from_env(
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<Scope>, crate::Error> {
    let Some(value) = env(SCOPE_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.to_str() {
        Some("user") => Ok(Some(Scope::User)),
        Some("system") => Ok(Some(Scope::System)),
        Some("auto") => Ok(Some(Scope::Auto)),
        _ => Err(crate::Error::InvalidEnvironment {
            variable: SCOPE_ENV,
            value: value.to_string_lossy().into_owned(),
            expected: "one of user, system, auto",
        }),
    }
}

/// The system scope's shared lock directory, for names whose deployment made them no directory
/// of their own under `/run/unique-instance/`.
pub(crate) const SYSTEM_LOCK_DIR: &str = "/run/lock/unique-instance";

/// Where the lock file lives and who may own it.
#[derive(Debug, Clone)]
pub(crate) struct LockPlan {
    /// The instance name, for errors (the file name may be anything `lock_file` was given).
    pub(crate) instance: String,
    pub(crate) dir: PathBuf,
    /// Byte-exact: a non-UTF-8 `lock_file` is locked under its own name, not a lossy one.
    pub(crate) file_name: OsString,
    /// Root may own the file and directory (system scope).
    pub(crate) root_may_own: bool,
    /// The directory is the shared [`SYSTEM_LOCK_DIR`], which only root may create.
    pub(crate) shared_system_dir: bool,
    /// The directory is created if missing, with this mode.
    pub(crate) create_dir_mode: Option<u32>,
    /// The directory must be exactly 0700 and ours (a per-user fallback in a shared place).
    pub(crate) private_dir: bool,
    /// The directory is a deployed service's own (`/run/unique-instance/NAME`): made by root,
    /// owned by root or the service's user, writable by no one else.
    pub(crate) service_dir: bool,
    pub(crate) file_mode: u32,
}

impl LockPlan {
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(&self.file_name)
    }
}

/// Why a bus was chosen, for `Debug`, logs and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BusPlan {
    pub(crate) kind: BusKind,
    pub(crate) why: &'static str,
}

/// True when the lock file should follow the system rules.
pub(crate) fn lock_is_system(scope: Scope, euid: u32) -> bool {
    match scope {
        Scope::System => true,
        Scope::User => false,
        Scope::Auto => euid == 0,
    }
}

/// The bus for `scope`, from the environment, deterministically.
pub(crate) fn choose_bus(scope: Scope, env: &dyn Fn(&str) -> Option<String>) -> Option<BusPlan> {
    let session_configured = || {
        if env("DBUS_SESSION_BUS_ADDRESS").is_some_and(|a| !a.is_empty()) {
            return Some("DBUS_SESSION_BUS_ADDRESS is set");
        }
        let runtime = env("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute())?;
        Path::new(&runtime)
            .join("bus")
            .exists()
            .then_some("$XDG_RUNTIME_DIR/bus exists")
    };
    match scope {
        Scope::User => session_configured().map(|why| BusPlan {
            kind: BusKind::Session,
            why,
        }),
        Scope::System => Some(BusPlan {
            kind: BusKind::System,
            why: "system scope",
        }),
        Scope::Auto => {
            if let Some(why) = session_configured() {
                Some(BusPlan {
                    kind: BusKind::Session,
                    why,
                })
            } else if env("INVOCATION_ID").is_some() {
                Some(BusPlan {
                    kind: BusKind::System,
                    why: "started by systemd (INVOCATION_ID is set) with no session bus",
                })
            } else if env("DBUS_STARTER_BUS_TYPE").as_deref() == Some("system") {
                Some(BusPlan {
                    kind: BusKind::System,
                    why: "activated by the system bus (DBUS_STARTER_BUS_TYPE=system)",
                })
            } else {
                None
            }
        }
    }
}

/// Where deployed services' own lock directories are (`generate` writes the tmpfiles line).
pub(crate) const SERVICE_LOCK_BASE: &str = "/run/unique-instance";

/// The per-service lock directory `BASE/NAME` when it exists: `Ok(None)` when it (or `BASE`)
/// does not; an error when it exists but anyone but root (and, for `NAME`, its owner) could
/// write it, or either is not a plain directory. A deployment that made it meant it to be used,
/// so a broken one is refused rather than silently replaced by the shared directory.
pub(crate) fn service_lock_dir(base: &Path, name: &str) -> Result<Option<PathBuf>, crate::Error> {
    use crate::error::UnsafeLockPath;
    let dir = base.join(name);
    for (path, root_only) in [(base, true), (dir.as_path(), false)] {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::Error::io("cannot examine", path, e)),
        };
        let problem = if meta.file_type().is_symlink() {
            Some(UnsafeLockPath::Symlink)
        } else if !meta.is_dir() {
            Some(UnsafeLockPath::NotRegularFile {
                kind: "non-directory",
            })
        } else if root_only && meta.uid() != 0 {
            Some(UnsafeLockPath::ForeignDirectory {
                dir: path.to_owned(),
                owner: meta.uid(),
            })
        } else if meta.mode() & 0o022 != 0 {
            Some(UnsafeLockPath::InsecureDirectory {
                dir: path.to_owned(),
                mode: meta.mode() & 0o7777,
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(crate::Error::UnsafeLockPath {
                path: path.to_owned(),
                problem,
            });
        }
    }
    Ok(Some(dir))
}

/// Where per-user lock directories go when it is fit for them (see [`user_lock_dir`]).
pub(crate) const USER_LOCK_BASE: &str = "/run/lock";
/// Where they go otherwise.
pub(crate) const USER_LOCK_FALLBACK_BASE: &str = "/tmp";

/// The per-user lock directory, from the UID alone: `/run/lock/unique-instance-UID` when
/// `/run/lock` is a root-owned sticky directory writable by all (Debian, Ubuntu), else
/// `/tmp/unique-instance-UID`. Never `XDG_RUNTIME_DIR` or `/run/user/UID`: they depend on the
/// environment and on a login session, so two copies of one user would meet at different files
/// (cron, ssh, `sudo -u`, after logout). The directory is made 0700 and verified (ours, 0700,
/// not a symlink) before use, since another user may pre-create the name: that is refused.
pub(crate) fn user_lock_dir(euid: u32) -> PathBuf {
    user_lock_dir_in(
        Path::new(USER_LOCK_BASE),
        Path::new(USER_LOCK_FALLBACK_BASE),
        euid,
    )
}

/// [`user_lock_dir`] with other bases, for tests.
pub(crate) fn user_lock_dir_in(run_lock: &Path, fallback: &Path, euid: u32) -> PathBuf {
    // Machine state, not environment: every copy on this machine sees the same answer.
    let shared_sticky = std::fs::symlink_metadata(run_lock)
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o1002 == 0o1002);
    let base = if shared_sticky { run_lock } else { fallback };
    base.join(format!("unique-instance-{euid}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn os_env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let env = env_of(pairs);
        move |k: &str| env(k).map(OsString::from)
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn auto_bus_prefers_session_then_systemd_then_activation_then_none() {
        let session = env_of(&[
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x"),
            ("INVOCATION_ID", "1"),
        ]);
        assert_eq!(
            choose_bus(Scope::Auto, &session).map(|b| b.kind),
            Some(BusKind::Session)
        );
        let unit = env_of(&[("INVOCATION_ID", "abc")]);
        assert_eq!(
            choose_bus(Scope::Auto, &unit).map(|b| b.kind),
            Some(BusKind::System)
        );
        let activated = env_of(&[("DBUS_STARTER_BUS_TYPE", "system")]);
        assert_eq!(
            choose_bus(Scope::Auto, &activated).map(|b| b.kind),
            Some(BusKind::System)
        );
        let session_activated = env_of(&[("DBUS_STARTER_BUS_TYPE", "session")]);
        assert_eq!(choose_bus(Scope::Auto, &session_activated), None);
        assert_eq!(choose_bus(Scope::Auto, &env_of(&[])), None);
    }

    #[test]
    fn explicit_scopes_pick_their_bus() {
        assert_eq!(choose_bus(Scope::User, &env_of(&[])), None);
        assert_eq!(
            choose_bus(Scope::System, &env_of(&[])).map(|b| b.kind),
            Some(BusKind::System)
        );
    }

    #[test]
    fn lock_follows_who_you_are() {
        assert!(lock_is_system(Scope::Auto, 0));
        assert!(!lock_is_system(Scope::Auto, 1000));
        assert!(lock_is_system(Scope::System, 1000));
        assert!(!lock_is_system(Scope::User, 0));
    }

    #[test]
    fn scope_from_the_environment_is_exact() {
        assert_eq!(scope_from_env(&os_env_of(&[])).ok(), Some(None));
        assert_eq!(
            scope_from_env(&os_env_of(&[(SCOPE_ENV, "")])).ok(),
            Some(None)
        );
        for (value, scope) in [
            ("user", Scope::User),
            ("system", Scope::System),
            ("auto", Scope::Auto),
        ] {
            assert_eq!(
                scope_from_env(&os_env_of(&[(SCOPE_ENV, value)])).ok(),
                Some(Some(scope))
            );
        }
        for bad in ["System", "machine", " system"] {
            match scope_from_env(&os_env_of(&[(SCOPE_ENV, bad)])) {
                Err(crate::Error::InvalidEnvironment {
                    variable, value, ..
                }) => {
                    assert_eq!((variable, value.as_str()), (SCOPE_ENV, bad));
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
        // Not UTF-8: an error, not "unset" (which would silently mean Auto).
        use std::os::unix::ffi::OsStringExt;
        let bytes = |k: &str| (k == SCOPE_ENV).then(|| OsString::from_vec(b"syst\xffem".to_vec()));
        assert!(matches!(
            scope_from_env(&bytes),
            Err(crate::Error::InvalidEnvironment {
                variable: SCOPE_ENV,
                ..
            })
        ));
    }

    #[test]
    fn user_dir_depends_on_the_uid_alone() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let run_lock = base.path().join("run-lock");
        let fallback = base.path().join("tmp");
        // Missing /run/lock: the fallback.
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 4_000_000),
            fallback.join("unique-instance-4000000")
        );
        // Not sticky and world-writable: the fallback.
        std::fs::create_dir(&run_lock).expect("mkdir");
        std::fs::set_permissions(&run_lock, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 1000),
            fallback.join("unique-instance-1000")
        );
        std::fs::set_permissions(&run_lock, std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        let root_owned = rustix::process::geteuid().is_root();
        let expected = if root_owned { &run_lock } else { &fallback };
        assert_eq!(
            user_lock_dir_in(&run_lock, &fallback, 1000),
            expected.join("unique-instance-1000")
        );
        // Nothing from the environment is consulted: the function takes none. On this machine:
        let here = user_lock_dir(1000);
        assert!(
            here == Path::new("/run/lock/unique-instance-1000")
                || here == Path::new("/tmp/unique-instance-1000"),
            "{here:?}"
        );
    }
}
